/* The pod sandbox's process: holds the pod's namespaces and does nothing else.
 * Exits 0 on SIGTERM/SIGINT; as PID 1 of its PID namespace it also reaps any orphan. */
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, NULL, WNOHANG) > 0) {} }

int main(void) {
    signal(SIGTERM, stop);
    signal(SIGINT, stop);
    signal(SIGCHLD, reap);
    for (;;) pause();
    return 0;
}
