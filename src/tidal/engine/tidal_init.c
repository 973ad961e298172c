/*
 * tidal-init: PID 1 of a Tidal rich container.
 *
 * Why C: it runs inside arbitrary images (busybox, Debian minbase) that have no Python, so it
 * is built once on the host as a static binary (tidal.engine.richinit) and bind-mounted
 * read-only at /.tidal/init.
 *
 * It reads /.tidal/init.conf (tab-separated lines, written by tidal.engine.bundle.init_conf):
 *   initscript <path>                         run with /bin/sh before every (re)start of main
 *   main <policy> <max> <argv...>             the container's main command
 *   service <name> <policy> <max> <argv...>   extra supervised services (syslog, cron, sshd ...)
 * policy is no | on-failure | always. It starts the services and the main command, restarts
 * them per policy (with a growing back-off), reaps every zombie (it is PID 1: orphans land
 * here), forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT/SIGUSR1/SIGUSR2 to the main command's process
 * group (and SIGTERM/SIGINT/SIGQUIT to the services), and when main is done stops the
 * services (SIGTERM, SIGKILL after 5 s) and exits with main's status (128+n for signal n).
 *
 * On every change it rewrites /.tidal/state/services (when that directory exists: the engine
 * binds it writable), one tab-separated line per process, so the engine can show what became
 * of each service without a protocol of its own:
 *   <name> <state> <restarts> <max> <last exit or -> <pid>
 * state is running | restarting | exited (done as its policy says) | gave-up (its policy wanted
 * a restart but max restarts were used up) | stopped (ended by the container's stop).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAXPROCS 32
#define MAXARGS 64
#define STOP_GRACE_S 5.0

enum policy { P_NO, P_ON_FAILURE, P_ALWAYS };

struct proc {
    char name[64];
    char *argv[MAXARGS + 1];
    enum policy policy;
    int max_restarts;
    int restarts;
    pid_t pid;
    double restart_at; /* 0: none pending */
    int done;
    int gave_up; /* the policy wanted a restart, but max_restarts were used up */
    int stopped; /* ended (or its restart cancelled) by the container's stop */
    int exited;  /* status below is valid */
    int status;  /* last exit status as a shell would report it */
};

static struct proc procs[MAXPROCS];
static int nprocs;
static struct proc *mainp;
static char *initscript;
static const char *state_dir = "/.tidal/state";
static void write_state(void);
static int stopping;
static long reaped_orphans;

static void logmsg(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "tidal-init: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static enum policy parse_policy(const char *s) {
    if (strcmp(s, "always") == 0) return P_ALWAYS;
    if (strcmp(s, "on-failure") == 0) return P_ON_FAILURE;
    return P_NO;
}

static int split(char *line, char **out, int max) {
    int n = 0;
    char *save = NULL;
    for (char *tok = strtok_r(line, "\t", &save); tok && n < max; tok = strtok_r(NULL, "\t", &save))
        out[n++] = tok;
    return n;
}

static void load_conf(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) {
        logmsg("cannot open %s: %s", path, strerror(errno));
        exit(127);
    }
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    while ((len = getline(&line, &cap, f)) > 0) {
        if (line[len - 1] == '\n') line[len - 1] = 0;
        char *fields[MAXARGS + 4];
        char *copy = strdup(line);
        int n = split(copy, fields, MAXARGS + 4);
        if (n == 0) continue;
        if (strcmp(fields[0], "initscript") == 0 && n >= 2) {
            initscript = fields[1];
            continue;
        }
        int is_main = strcmp(fields[0], "main") == 0;
        int first = is_main ? 1 : 2;
        if ((!is_main && strcmp(fields[0], "service") != 0) || n < first + 3 || nprocs >= MAXPROCS) {
            logmsg("ignoring bad line in %s: %s", path, line);
            continue;
        }
        struct proc *p = &procs[nprocs++];
        memset(p, 0, sizeof *p);
        snprintf(p->name, sizeof p->name, "%s", is_main ? "main" : fields[1]);
        p->policy = parse_policy(fields[first]);
        p->max_restarts = atoi(fields[first + 1]);
        int a = 0;
        for (int i = first + 2; i < n && a < MAXARGS; i++) p->argv[a++] = fields[i];
        p->argv[a] = NULL;
        if (is_main) mainp = p;
    }
    free(line);
    fclose(f);
    if (!mainp) {
        logmsg("%s has no main command", path);
        exit(127);
    }
}

static pid_t spawn(char *const argv[]) {
    pid_t pid = fork();
    if (pid < 0) {
        logmsg("fork failed: %s", strerror(errno));
        return -1;
    }
    if (pid == 0) {
        sigset_t all;
        sigfillset(&all);
        sigprocmask(SIG_UNBLOCK, &all, NULL);
        setpgid(0, 0);
        execvp(argv[0], argv);
        fprintf(stderr, "tidal-init: cannot run %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    setpgid(pid, pid);
    return pid;
}

static int shell_status(int st) {
    if (WIFEXITED(st)) return WEXITSTATUS(st);
    if (WIFSIGNALED(st)) return 128 + WTERMSIG(st);
    return 1;
}

/* The init script runs synchronously; children it leaves behind are reaped later. */
static int run_initscript(void) {
    if (!initscript) return 0;
    char *argv[] = {"/bin/sh", initscript, NULL};
    pid_t pid = spawn(argv);
    if (pid < 0) return 127;
    int st;
    while (waitpid(pid, &st, 0) < 0)
        if (errno != EINTR) return 127;
    int rc = shell_status(st);
    if (rc != 0) logmsg("initscript %s failed with status %d", initscript, rc);
    return rc;
}

static void start(struct proc *p) {
    p->restart_at = 0;
    if (p == mainp) {
        int rc = run_initscript();
        if (rc != 0) {
            p->status = rc;
            p->exited = 1;
            p->pid = 0;
            p->done = 1;
            return;
        }
    }
    p->pid = spawn(p->argv);
    p->done = p->pid <= 0;
    if (p->pid <= 0) p->status = 127, p->exited = 1;
    write_state();
}

static int wants_restart(struct proc *p, int status) {
    if (stopping || p->policy == P_NO) return 0;
    if (p->policy == P_ON_FAILURE && status == 0) return 0;
    return p->restarts < p->max_restarts;
}

static void on_exit_of(pid_t pid, int st) {
    for (int i = 0; i < nprocs; i++) {
        struct proc *p = &procs[i];
        if (p->pid != pid) continue;
        p->pid = 0;
        p->status = shell_status(st);
        p->exited = 1;
        p->stopped = stopping;
        if (wants_restart(p, p->status)) {
            p->restarts++;
            double delay = 0.2 * p->restarts;
            if (delay > 5) delay = 5;
            logmsg("%s exited with status %d; restart %d/%d in %.1fs", p->name, p->status,
                   p->restarts, p->max_restarts, delay);
            p->restart_at = now() + delay;
        } else {
            int wanted = !stopping && (p->policy == P_ALWAYS ||
                                       (p->policy == P_ON_FAILURE && p->status != 0));
            if (wanted) {
                p->gave_up = 1;
                logmsg("%s gave up after %d restarts (last exit status %d)", p->name,
                       p->restarts, p->status);
            } else if (p != mainp || p->status != 0) {
                logmsg("%s exited with status %d", p->name, p->status);
            }
            p->done = 1;
        }
        write_state();
        return;
    }
    reaped_orphans++;
}

static const char *state_of(const struct proc *p) {
    if (p->pid > 0) return "running";
    if (p->restart_at > 0) return "restarting";
    if (p->gave_up) return "gave-up";
    return p->stopped ? "stopped" : "exited";
}

/* Rewrite the state file (tmp + rename: a reader never sees half of it). */
static void write_state(void) {
    char path[256], tmp[256];
    snprintf(path, sizeof path, "%s/services", state_dir);
    snprintf(tmp, sizeof tmp, "%s/.services.tmp", state_dir);
    FILE *f = fopen(tmp, "w");
    if (!f) return; /* no state directory: nobody asked */
    for (int i = 0; i < nprocs; i++) {
        struct proc *p = &procs[i];
        char last[16] = "-";
        if (p->exited) snprintf(last, sizeof last, "%d", p->status);
        fprintf(f, "%s\t%s\t%d\t%d\t%s\t%d\n", p->name, state_of(p), p->restarts,
                p->max_restarts, last, (int)(p->pid > 0 ? p->pid : 0));
    }
    if (fclose(f) == 0) rename(tmp, path);
}

static void signal_services(int sig) {
    for (int i = 0; i < nprocs; i++)
        if (&procs[i] != mainp && procs[i].pid > 0) kill(-procs[i].pid, sig);
}

static int services_running(void) {
    for (int i = 0; i < nprocs; i++)
        if (&procs[i] != mainp && procs[i].pid > 0) return 1;
    return 0;
}

int main(int argc, char **argv) {
    if (getpid() != 1) logmsg("warning: not PID 1, orphans will not be reaped here");
    load_conf(argc > 1 ? argv[1] : "/.tidal/init.conf");
    sigset_t all;
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, NULL);

    for (int i = 0; i < nprocs; i++)
        if (&procs[i] != mainp) start(&procs[i]);
    start(mainp);

    double kill_at = 0;
    for (;;) {
        /* Start due restarts. */
        double t = now(), next = 0;
        for (int i = 0; i < nprocs; i++) {
            struct proc *p = &procs[i];
            if (p->restart_at > 0 && !stopping) {
                if (p->restart_at <= t)
                    start(p);
                else if (next == 0 || p->restart_at < next)
                    next = p->restart_at;
            } else if (p->restart_at > 0 && stopping) {
                p->restart_at = 0;
                p->done = 1;
                p->stopped = 1;
                write_state();
            }
        }
        if (mainp->done && mainp->restart_at == 0) {
            if (!stopping) {
                stopping = 1;
                signal_services(SIGTERM);
                kill_at = now() + STOP_GRACE_S;
            }
            if (!services_running()) break;
            if (now() >= kill_at) signal_services(SIGKILL);
            if (next == 0 || kill_at < next) next = kill_at;
        }
        struct timespec ts = {1, 0};
        if (next > 0) {
            double d = next - now();
            if (d < 0.01) d = 0.01;
            ts.tv_sec = (time_t)d;
            ts.tv_nsec = (long)((d - ts.tv_sec) * 1e9);
        }
        siginfo_t info;
        int sig = sigtimedwait(&all, &info, &ts);
        if (sig < 0) continue;
        if (sig == SIGCHLD) {
            int st;
            pid_t pid;
            while ((pid = waitpid(-1, &st, WNOHANG)) > 0) on_exit_of(pid, st);
            continue;
        }
        if (sig == SIGTERM || sig == SIGINT || sig == SIGQUIT) {
            stopping = 1;
            if (mainp->pid > 0) kill(-mainp->pid, sig);
            else mainp->done = 1, mainp->restart_at = 0;
            signal_services(sig);
            if (kill_at == 0) kill_at = now() + STOP_GRACE_S;
        } else if (sig == SIGHUP || sig == SIGUSR1 || sig == SIGUSR2 || sig == SIGWINCH) {
            if (mainp->pid > 0) kill(-mainp->pid, sig);
        }
    }
    write_state();
    if (reaped_orphans) logmsg("reaped %ld orphaned processes", reaped_orphans);
    return mainp->status;
}
