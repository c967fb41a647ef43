// Everything in this target is in the header but the child spawner below, which keeps
// state of its own (one thread for the whole process).
#include "ctunnel.h"
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <sys/wait.h>

// ---- Starting a child that dies with this process (NetBase.ChildProcess).
//
// posix_spawn cannot set a parent-death signal, so such a child is forked here and sets
// it itself before exec. The kernel sends that signal when the *thread* that forked
// exits, not the process, and the threads of Swift's pool come and go: every such fork
// is made by one thread that lives as long as the process and blocks every signal.

struct ctunnel_spawn_request {
    const char *path;
    char *const *argv;
    char *const *envp;
    const int *fds;
    int pdeathsig;
    pid_t pid;
    int error;
    int done;
};

static pthread_mutex_t spawn_serial = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t spawn_mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t spawn_cond = PTHREAD_COND_INITIALIZER;
static struct ctunnel_spawn_request *spawn_pending;
static pthread_once_t spawn_once = PTHREAD_ONCE_INIT;
static int spawn_thread_error;

static void spawn_fail(int report, int error) {
    ssize_t n;
    do { n = write(report, &error, sizeof error); } while (n < 0 && errno == EINTR);
    _exit(127);
}

static void spawn_close_from(int first, int last) {
    if (first > last) return;
#ifdef SYS_close_range
    if (syscall(SYS_close_range, (unsigned)first, (unsigned)last, 0) == 0) return;
#endif
    for (int fd = first; fd <= last && fd < 65536; fd++) close(fd);
}

/* In the child: only async-signal-safe calls from here to exec. */
static void spawn_child(const struct ctunnel_spawn_request *r, pid_t parent, int report) {
    if (r->pdeathsig != 0) {
        if (prctl(PR_SET_PDEATHSIG, r->pdeathsig, 0, 0, 0) != 0) spawn_fail(report, errno);
        /* The parent may have ended before the prctl: then the signal never comes. */
        if (getppid() != parent) _exit(128 + r->pdeathsig);
    }
    /* Copies above 2 first, so that moving one onto 0, 1 or 2 cannot overwrite another. */
    int moved[3];
    for (int i = 0; i < 3; i++) {
        moved[i] = fcntl(r->fds[i], F_DUPFD, 3);
        if (moved[i] < 0) spawn_fail(report, errno);
    }
    for (int i = 0; i < 3; i++) {
        if (dup2(moved[i], i) < 0) spawn_fail(report, errno);
    }
    /* Nothing else is inherited: a descriptor left open by accident would hold a pipe's
       end open in a daemon that outlives the test. */
    spawn_close_from(3, report - 1);
    spawn_close_from(report + 1, 0x7fffffff);
    /* Signals as a shell would leave them: every one at its default, none blocked. */
    struct sigaction defaults;
    memset(&defaults, 0, sizeof defaults);
    defaults.sa_handler = SIG_DFL;
    for (int sig = 1; sig < NSIG; sig++) sigaction(sig, &defaults, NULL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    execve(r->path, r->argv, r->envp);
    spawn_fail(report, errno);
}

static void spawn_now(struct ctunnel_spawn_request *r) {
    int report[2];
    if (syscall(SYS_pipe2, report, O_CLOEXEC) != 0) { r->error = errno; return; }
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0) {
        r->error = errno;
        close(report[0]);
        close(report[1]);
        return;
    }
    if (pid == 0) spawn_child(r, parent, report[1]);
    close(report[1]);
    /* EOF: the exec succeeded and closed the pipe; an int: why it failed. */
    int error = 0;
    ssize_t n;
    do { n = read(report[0], &error, sizeof error); } while (n < 0 && errno == EINTR);
    close(report[0]);
    if (n == (ssize_t)sizeof error) {
        int status;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
        r->error = error;
        return;
    }
    r->pid = pid;
    r->error = 0;
}

static void *spawn_thread(void *unused) {
    (void)unused;
    pthread_mutex_lock(&spawn_mutex);
    for (;;) {
        while (spawn_pending == NULL || spawn_pending->done) pthread_cond_wait(&spawn_cond, &spawn_mutex);
        spawn_now(spawn_pending);
        spawn_pending->done = 1;
        pthread_cond_broadcast(&spawn_cond);
    }
    return NULL;
}

static void spawn_start_thread(void) {
    pthread_attr_t attributes;
    pthread_attr_init(&attributes);
    pthread_attr_setdetachstate(&attributes, PTHREAD_CREATE_DETACHED);
    /* The thread inherits this mask: no signal handler ever runs on it. */
    sigset_t all, previous;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &previous);
    pthread_t thread;
    spawn_thread_error = pthread_create(&thread, &attributes, spawn_thread, NULL);
    pthread_sigmask(SIG_SETMASK, &previous, NULL);
    pthread_attr_destroy(&attributes);
}

int ctunnel_spawn_with_parent_death_signal(const char *path, char *const argv[], char *const envp[],
                                           const int fds[3], int pdeathsig, pid_t *pid) {
    pthread_once(&spawn_once, spawn_start_thread);
    if (spawn_thread_error != 0) return spawn_thread_error;
    struct ctunnel_spawn_request request = {path, argv, envp, fds, pdeathsig, -1, 0, 0};
    pthread_mutex_lock(&spawn_serial);
    pthread_mutex_lock(&spawn_mutex);
    spawn_pending = &request;
    pthread_cond_broadcast(&spawn_cond);
    while (!request.done) pthread_cond_wait(&spawn_cond, &spawn_mutex);
    spawn_pending = NULL;
    pthread_mutex_unlock(&spawn_mutex);
    pthread_mutex_unlock(&spawn_serial);
    *pid = request.pid;
    return request.error;
}
