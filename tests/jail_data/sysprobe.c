/* sysprobe: make raw syscalls and report each result, for seccomp tests.
 *
 *   sysprobe NR[,ARG...] ...   one syscall per word: prints "NR RET ERRNO"
 *   sysprobe status            prints the Seccomp and NoNewPrivs lines of
 *                              /proc/self/status
 *
 * Built static by the tests, so that before main() it makes only the few
 * syscalls a static glibc start-up makes; every line goes out with one
 * write(2) as soon as it is known, so a kill shows how far it got. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static void say(const char *s) { (void)!write(1, s, strlen(s)); }

static int status(void) {
    char buf[8192], line[256];
    int fd = open("/proc/self/status", O_RDONLY);
    if (fd < 0) return 1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 1;
    buf[n] = 0;
    for (char *p = strtok(buf, "\n"); p; p = strtok(NULL, "\n"))
        if (!strncmp(p, "Seccomp:", 8) || !strncmp(p, "NoNewPrivs:", 11)) {
            snprintf(line, sizeof line, "%s\n", p);
            say(line);
        }
    return 0;
}

int main(int argc, char **argv) {
    char line[128];
    if (argc == 2 && !strcmp(argv[1], "status")) return status();
    for (int i = 1; i < argc; i++) {
        long a[7] = {0};
        int k = 0;
        for (char *p = strtok(argv[i], ","); p && k < 7; p = strtok(NULL, ","))
            a[k++] = strtol(p, NULL, 0);
        errno = 0;
        long r = syscall(a[0], a[1], a[2], a[3], a[4], a[5], a[6]);
        snprintf(line, sizeof line, "%ld %ld %d\n", a[0], r, r == -1 ? errno : 0);
        say(line);
    }
    return 0;
}
