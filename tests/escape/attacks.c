/* attacks: escape attempts run inside a jail by tests/escape/.
 *
 *   attacks ATTACK [ARGS...]
 *
 * Each attack prints, with one write(2) per line so a kill shows how far it
 * got:
 *   {"attack": A, "stage": "trying", "detail": ...}   just before the
 *                                                     decisive syscall
 *   {"attack": A, "escaped": B, "errno": E, "detail": ...}   its outcome
 * "escaped" means the operation the attacker wanted succeeded; "errno" names
 * how it failed ("" when it did not fail).  A seccomp kill leaves only the
 * "trying" line and status 159: the tests check which one they expected.
 *
 * Built static so that its start-up fits the coreutils seccomp policy of
 * examples/profiles/filtered.conf (execve, brk, arch_prctl, ... write,
 * exit_group), and the attack is the only thing a filter can object to. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

static const char *self_path;

static void out(const char *s) { (void)!write(1, s, strlen(s)); }

static const char *ename(int e) {
    const char *n = e ? strerrorname_np(e) : "";
    return n ? n : "E?";
}

/* detail strings are ours or paths: keep them JSON-safe */
static void clean(char *dst, const char *src, size_t n) {
    size_t i = 0;
    for (; src && *src && i + 1 < n; src++)
        dst[i++] = (*src == '"' || *src == '\\' || (unsigned char)*src < 0x20) ? '?' : *src;
    dst[i] = 0;
}

static void trying(const char *attack, const char *detail) {
    char d[512], line[700];
    clean(d, detail, sizeof d);
    snprintf(line, sizeof line, "{\"attack\": \"%s\", \"stage\": \"trying\", \"detail\": \"%s\"}\n",
             attack, d);
    out(line);
}

static int outcome(const char *attack, int escaped, int err, const char *detail) {
    char d[512], line[700];
    clean(d, detail, sizeof d);
    snprintf(line, sizeof line,
             "{\"attack\": \"%s\", \"escaped\": %s, \"errno\": \"%s\", \"detail\": \"%s\"}\n",
             attack, escaped ? "true" : "false", ename(err), d);
    out(line);
    return 0;
}

/* -- files ---------------------------------------------------------------- */

/* read PATH [SECRET]: escaped if PATH opens and reads (and holds SECRET) */
static int a_read(const char *a, char **v) {
    char buf[4096] = {0};
    trying(a, v[0]);
    int fd = open(v[0], O_RDONLY);
    if (fd < 0) return outcome(a, 0, errno, v[0]);
    ssize_t n = read(fd, buf, sizeof buf - 1);
    int e = n < 0 ? errno : 0;
    close(fd);
    int got = n > 0 && (!v[1] || strstr(buf, v[1]));
    return outcome(a, got, e, got ? "read it" : "opened, but no secret");
}

/* write PATH: escaped if PATH can be created and written */
static int a_write(const char *a, char **v) {
    trying(a, v[0]);
    int fd = open(v[0], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return outcome(a, 0, errno, v[0]);
    ssize_t n = write(fd, "pwned\n", 6);
    int e = n < 0 ? errno : 0;
    close(fd);
    return outcome(a, n == 6, e, "written");
}

/* fill DIR MAX_MB: write 1 MiB chunks into DIR/fill until refused (at most
 * MAX_MB, so a missing limit cannot hurt the host); detail = MiB written */
static int a_fill(const char *a, char **v) {
    static char chunk[1 << 20];
    char path[4096], d[64];
    long max = atol(v[1]), mb = 0;
    int e = 0;
    memset(chunk, 'x', sizeof chunk);
    snprintf(path, sizeof path, "%s/fill", v[0]);
    trying(a, path);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) return outcome(a, 0, errno, "open");
    for (; mb < max; mb++) {
        ssize_t n = write(fd, chunk, sizeof chunk);
        if (n != (ssize_t)sizeof chunk) { e = n < 0 ? errno : ENOSPC; break; }
    }
    close(fd);   /* left for the jail's tmpfs to take away: unlink is not in every policy */
    snprintf(d, sizeof d, "%ld", mb);
    return outcome(a, mb >= max, e, d);
}

/* -- processes -------------------------------------------------------------- */

/* see REKRAM: escaped if any /proc/PID/cmdline holds MARKER, which is given
 * reversed so that the command lines of this program and of the launcher that
 * started it do not hold it; detail = how many pids were visible (at least
 * our own, or the scan did not run) */
static int a_see(const char *a, char **v) {
    char path[300], buf[4096], d[64], marker[256] = {0};
    int seen = 0, found = 0;
    size_t len = strlen(v[0]) < sizeof marker ? strlen(v[0]) : sizeof marker - 1;
    for (size_t i = 0; i < len; i++) marker[i] = v[0][len - 1 - i];
    trying(a, v[0]);
    DIR *dir = opendir("/proc");
    if (!dir) return outcome(a, 0, errno, "opendir /proc");
    for (struct dirent *de; (de = readdir(dir));) {
        if (de->d_name[0] < '0' || de->d_name[0] > '9') continue;
        seen++;
        snprintf(path, sizeof path, "/proc/%s/cmdline", de->d_name);
        int fd = open(path, O_RDONLY);
        if (fd < 0) continue;
        ssize_t n = read(fd, buf, sizeof buf - 1);
        close(fd);
        for (ssize_t i = 0; i < n; i++) if (!buf[i]) buf[i] = ' ';
        if (n > 0) { buf[n] = 0; if (strstr(buf, marker)) found = 1; }
    }
    closedir(dir);
    snprintf(d, sizeof d, "%d", seen);
    return outcome(a, found, 0, d);
}

/* signal PID: escaped if kill(PID, SIGKILL) succeeds */
static int a_signal(const char *a, char **v) {
    trying(a, v[0]);
    int r = kill(atoi(v[0]), SIGKILL);
    return outcome(a, r == 0, r ? errno : 0, v[0]);
}

/* ptrace PID: escaped if PTRACE_ATTACH succeeds */
static int a_ptrace(const char *a, char **v) {
    trying(a, v[0]);
    long r = ptrace(PTRACE_ATTACH, atoi(v[0]), 0, 0);
    return outcome(a, r == 0, r ? errno : 0, v[0]);
}

/* fds: escaped if this process holds any fd but 0, 1, 2 (and the one
 * reading /proc/self/fd); detail names what each extra fd is */
static int a_fds(const char *a, char **v) {
    (void)v;
    char d[512] = "", path[300], link[256];
    int extra = 0;
    trying(a, "/proc/self/fd");
    DIR *dir = opendir("/proc/self/fd");
    if (!dir) return outcome(a, 0, errno, "opendir");
    for (struct dirent *de; (de = readdir(dir));) {
        int fd = atoi(de->d_name);
        if (de->d_name[0] == '.' || fd <= 2 || fd == dirfd(dir)) continue;
        snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
        ssize_t n = readlink(path, link, sizeof link - 1);
        link[n > 0 ? n : 0] = 0;
        snprintf(d + strlen(d), sizeof d - strlen(d), "%d=%s ", fd, link);
        extra++;
    }
    closedir(dir);
    return outcome(a, extra > 0, 0, extra ? d : "0,1,2 only");
}

/* steal-fds PID: pidfd_getfd(PID, 0..63), the way to take a socket another
 * process holds; escaped if any fd comes over */
static int a_steal_fds(const char *a, char **v) {
    char d[64];
    trying(a, v[0]);
    int pidfd = syscall(SYS_pidfd_open, atoi(v[0]), 0);
    if (pidfd < 0) return outcome(a, 0, errno, "pidfd_open");
    int stolen = 0, last = 0;
    for (int fd = 0; fd < 64; fd++) {
        int got = syscall(SYS_pidfd_getfd, pidfd, fd, 0);
        if (got >= 0) { stolen++; close(got); }
        else if (errno != EBADF) last = errno;
    }
    snprintf(d, sizeof d, "stole %d", stolen);
    return outcome(a, stolen > 0, stolen ? 0 : last, d);
}

/* reopen-fds PID: open each /proc/PID/fd/N, the way to reach what another
 * process holds (a socket, a pipe to the launcher) without pidfd_getfd;
 * escaped if any opens.  Seeing the fd numbers alone is not enough. */
static int a_reopen_fds(const char *a, char **v) {
    char path[300], fdpath[600], d[512] = "";
    int opened = 0, e = 0;
    snprintf(path, sizeof path, "/proc/%s/fd", v[0]);
    trying(a, path);
    DIR *dir = opendir(path);
    if (!dir) return outcome(a, 0, errno, path);
    for (struct dirent *de; (de = readdir(dir));) {
        if (de->d_name[0] == '.') continue;
        snprintf(fdpath, sizeof fdpath, "%s/%s", path, de->d_name);
        int fd = open(fdpath, O_RDONLY | O_NONBLOCK);
        if (fd >= 0) {
            opened++;
            snprintf(d + strlen(d), sizeof d - strlen(d), "%s ", de->d_name);
            close(fd);
        } else e = errno;
    }
    closedir(dir);
    if (!opened && !e) return outcome(a, 0, ENOENT, "no fds listed");
    return outcome(a, opened > 0, opened ? 0 : e, opened ? d : "none opened");
}

/* detach MARKER: double fork + setsid; the grandchild re-executes this
 * program as `sleeper MARKER` and sleeps a minute.  The test then kills the
 * jail and looks for MARKER on the host. */
static int a_detach(const char *a, char **v) {
    trying(a, v[0]);
    pid_t p = fork();
    if (p < 0) return outcome(a, 0, errno, "fork");
    if (p == 0) {
        setsid();
        if (fork() == 0) {
            char *argv[] = {(char *)self_path, "sleeper", v[0], NULL};
            execv(self_path, argv);
            _exit(127);
        }
        _exit(0);
    }
    waitpid(p, NULL, 0);
    outcome(a, 0, 0, "detached; the test decides");
    if (v[1] && !strcmp(v[1], "stay")) {
        struct timespec t = {60, 0};
        nanosleep(&t, NULL);
    }
    return 0;
}

static int a_sleeper(const char *a, char **v) {
    (void)a; (void)v;
    struct timespec t = {60, 0};
    nanosleep(&t, NULL);
    return 0;
}

/* nproc MAX: fork sleeping children until refused (at most MAX); detail =
 * how many were made.  The children are killed before reporting. */
static int a_nproc(const char *a, char **v) {
    int max = atoi(v[0]), n = 0, e = 0;
    pid_t kids[4096];
    if (max > 4096) max = 4096;
    trying(a, v[0]);
    for (; n < max; n++) {
        pid_t p = fork();
        if (p < 0) { e = errno; break; }
        if (p == 0) { struct timespec t = {30, 0}; nanosleep(&t, NULL); _exit(0); }
        kids[n] = p;
    }
    for (int i = 0; i < n; i++) kill(kids[i], SIGKILL);
    for (int i = 0; i < n; i++) waitpid(kids[i], NULL, 0);
    char d[64];
    snprintf(d, sizeof d, "%d", n);
    return outcome(a, n >= max, e, d);
}

/* -- privilege -------------------------------------------------------------- */

/* whoami: what this process holds (run after exec of a setuid copy);
 * errno is set when /proc/self/status could not be read (capeff unknown) */
static int a_whoami(const char *a, char **v) {
    (void)v;
    char buf[8192] = {0}, d[128], *cap = NULL;
    int e = 0, fd = open("/proc/self/status", O_RDONLY);
    if (fd >= 0) { (void)!read(fd, buf, sizeof buf - 1); close(fd); } else e = errno;
    if ((cap = strstr(buf, "CapEff:\t"))) cap += 8;
    unsigned long long eff = cap ? strtoull(cap, NULL, 16) : 0;
    snprintf(d, sizeof d, "euid=%d capeff=%s%llx", (int)geteuid(), cap ? "" : "?", eff);
    return outcome(a, geteuid() == 0 || eff != 0, e, d);
}

/* exec PROGRAM: exec a setuid-root or file-capability copy of this program
 * as `PROGRAM whoami`; the copy reports what it gained */
static int a_exec(const char *a, char **v) {
    trying(a, v[0]);
    char *argv[] = {v[0], "whoami", NULL};
    execv(v[0], argv);
    return outcome(a, 0, errno, "execv");
}

static int a_mount(const char *a, char **v) {
    (void)v;
    trying(a, "tmpfs on /tmp");
    int r = mount("none", "/tmp", "tmpfs", 0, NULL);
    return outcome(a, r == 0, r ? errno : 0, "mount tmpfs");
}

static int a_remount(const char *a, char **v) {
    (void)v;
    trying(a, "/ read-write");
    int r = mount(NULL, "/", NULL, MS_REMOUNT | MS_BIND, NULL);
    return outcome(a, r == 0, r ? errno : 0, "remount / rw");
}

static int a_umount(const char *a, char **v) {
    (void)v;
    trying(a, "/tmp");
    int r = umount2("/tmp", MNT_DETACH);
    return outcome(a, r == 0, r ? errno : 0, "umount /tmp");
}

static int a_pivot_root(const char *a, char **v) {
    (void)v;
    trying(a, "/tmp");
    int r = syscall(SYS_pivot_root, "/tmp", "/tmp");
    return outcome(a, r == 0, r ? errno : 0, "pivot_root");
}

/* userns SECRET_FILE HOST_FILE: unshare a user and mount namespace (full
 * capabilities inside it), then use them on the host's files: read
 * SECRET_FILE, remount / read-write, create HOST_FILE.  Creating the
 * namespaces is allowed to unprivileged users; only using them on the host
 * would be an escape. */
static int a_userns(const char *a, char **v) {
    char d[300];
    trying(a, "unshare(CLONE_NEWUSER|CLONE_NEWNS)");
    if (unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0)
        return outcome(a, 0, errno, "unshare refused");
    int got = 0, e = 0, fd;
    if ((fd = open(v[0], O_RDONLY)) >= 0) { got |= 1; close(fd); } else e = errno;
    if (mount(NULL, "/", NULL, MS_REMOUNT | MS_BIND, NULL) == 0) got |= 2; else e = errno;
    if ((fd = open(v[1], O_WRONLY | O_CREAT, 0644)) >= 0) { got |= 4; close(fd); } else e = errno;
    snprintf(d, sizeof d, "unshared; read=%d remount=%d create=%d",
             !!(got & 1), !!(got & 2), !!(got & 4));
    return outcome(a, got != 0, e, d);
}

/* -- alternative syscall entries ---------------------------------------------- */

static long int80(long nr, long b, long c, long d) {
    long r;
    __asm__ volatile("int $0x80" : "=a"(r) : "a"(nr), "b"(b), "c"(c), "d"(d) : "memory");
    return r;
}

/* int80 NR: the 32-bit entry; succeeds (no error) where the filter misses it */
static int a_int80(const char *a, char **v) {
    trying(a, v[0]);
    long r = int80(atol(v[0]), 0, 0, 0);
    char d[64];
    snprintf(d, sizeof d, "ret=%ld", r);
    return outcome(a, r >= 0, r < 0 ? (int)-r : 0, d);
}

/* int80-socket: socketcall(SYS_SOCKET, {AF_INET, SOCK_STREAM, 0}) on the
 * 32-bit entry: a socket family the 64-bit policy does not allow */
static int a_int80_socket(const char *a, char **v) {
    (void)v;
    static unsigned int args[3] = {AF_INET, SOCK_STREAM, 0};   /* below 4 GiB: static */
    trying(a, "socketcall(SYS_SOCKET, AF_INET)");
    long r = int80(102, 1, (long)(unsigned long)args, 0);
    char d[64];
    snprintf(d, sizeof d, "ret=%ld", r);
    return outcome(a, r >= 0, r < 0 ? (int)-r : 0, d);
}

/* raw NR: syscall(2) with the number */
static int a_raw(const char *a, char **v) {
    trying(a, v[0]);
    long r = syscall(strtol(v[0], NULL, 0), 0, 0, 0);
    char d[64];
    snprintf(d, sizeof d, "ret=%ld", r);
    return outcome(a, r >= 0, r < 0 ? errno : 0, d);
}

/* io_uring: a ring would run openat/connect/... without those syscalls */
static int a_io_uring(const char *a, char **v) {
    (void)v;
    char params[120] = {0};   /* struct io_uring_params */
    trying(a, "io_uring_setup");
    long r = syscall(425, 4, params);
    if (r >= 0) close(r);
    return outcome(a, r >= 0, r < 0 ? errno : 0, "io_uring_setup");
}

/* -- network and terminal ------------------------------------------------------ */

/* inet ADDR PORT: a TCP connection out */
static int a_inet(const char *a, char **v) {
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(v[1]))};
    inet_pton(AF_INET, v[0], &sa.sin_addr);
    trying(a, v[0]);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0) return outcome(a, 0, errno, "socket");
    int r = connect(s, (struct sockaddr *)&sa, sizeof sa);
    int e = r ? errno : 0;
    close(s);
    return outcome(a, r == 0, e, "connect");
}

/* unix PATH: a unix socket connection; PATH "@name" is abstract */
static int a_unix(const char *a, char **v) {
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    socklen_t len = offsetof(struct sockaddr_un, sun_path) + strlen(v[0]);
    strncpy(sa.sun_path, v[0], sizeof sa.sun_path - 1);
    if (v[0][0] == '@') sa.sun_path[0] = 0;
    trying(a, v[0]);
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    if (s < 0) return outcome(a, 0, errno, "socket");
    int r = connect(s, (struct sockaddr *)&sa, len);
    int e = r ? errno : 0;
    close(s);
    return outcome(a, r == 0, e, "connect");
}

/* tiocsti TEXT: push TEXT into the input of the terminal on fd 0 */
static int a_tiocsti(const char *a, char **v) {
    int ok = 0, e = 0;
    trying(a, v[0]);
    for (const char *c = v[0]; *c; c++) {
        if (ioctl(0, TIOCSTI, c) == 0) ok++; else { e = errno; break; }
    }
    return outcome(a, ok > 0, e, "TIOCSTI");
}

static const struct { const char *name; int nargs; int (*fn)(const char *, char **); } ATTACKS[] = {
    {"read", 1, a_read}, {"write", 1, a_write}, {"fill", 2, a_fill},
    {"see", 1, a_see}, {"signal", 1, a_signal}, {"ptrace", 1, a_ptrace},
    {"fds", 0, a_fds}, {"steal-fds", 1, a_steal_fds}, {"reopen-fds", 1, a_reopen_fds},
    {"detach", 1, a_detach}, {"sleeper", 1, a_sleeper}, {"nproc", 1, a_nproc},
    {"whoami", 0, a_whoami}, {"exec", 1, a_exec},
    {"mount", 0, a_mount}, {"remount", 0, a_remount}, {"umount", 0, a_umount},
    {"pivot_root", 0, a_pivot_root}, {"userns", 2, a_userns},
    {"int80", 1, a_int80}, {"int80-socket", 0, a_int80_socket}, {"raw", 1, a_raw},
    {"io_uring", 0, a_io_uring}, {"inet", 2, a_inet}, {"unix", 1, a_unix},
    {"tiocsti", 1, a_tiocsti},
};

int main(int argc, char **argv) {
    self_path = argv[0];
    for (size_t i = 0; argc >= 2 && i < sizeof ATTACKS / sizeof *ATTACKS; i++)
        if (!strcmp(argv[1], ATTACKS[i].name)) {
            if (argc - 2 < ATTACKS[i].nargs) break;
            return ATTACKS[i].fn(argv[1], argv + 2);
        }
    out("usage: attacks ATTACK [ARGS...]\n");
    return 2;
}
