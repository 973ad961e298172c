/* The pod sandbox's process: holds the pod's namespaces and does nothing else.
 * Exits 0 on SIGTERM/SIGINT; as PID 1 of its PID namespace it also reaps any orphan.
 * "pause -n NAME" sets the hostname and exits: a warm gVisor sandbox handed to an instance
 * is renamed from inside its own kernel (runsc exec --cap CAP_SYS_ADMIN). */
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, NULL, WNOHANG) > 0) {} }

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "-n") == 0)
        return sethostname(argv[2], strlen(argv[2])) == 0 ? 0 : 1;
    signal(SIGTERM, stop);
    signal(SIGINT, stop);
    signal(SIGCHLD, reap);
    for (;;) pause();
    return 0;
}
