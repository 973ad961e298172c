"""User-space block device (FUSE), loop devices, ext4 mounts, and the image builder."""
