/* seccomp_runner: let the kernel run a seccomp BPF program on chosen syscalls.
 *
 * Input (stdin, native byte order):
 *   u32 mode      0 batch: every call in one filtered thread, a new process
 *                   only after a death; 1 isolated: a new process per call;
 *                   2 load only: report whether seccomp(2) accepts the program
 *   u32 ninsns, then ninsns struct sock_filter
 *   u32 ncalls, then ncalls of { u32 abi (0 syscall, 1 int 0x80); u32 nr; u64 args[6] }
 * Output (stdout): one struct result per call (one in mode 2).
 *
 * The filter is installed in a worker thread only (no TSYNC): the main
 * thread stays unfiltered and reports.  The worker makes each call with
 * inline assembly, so nothing else runs between loading and the calls; it
 * leaves through exit(2) with MAGIC in arg5, which the caller's program is
 * expected to allow (tests prepend a check for it).  A SIGSYS handler
 * (SECCOMP_RET_TRAP) records the siginfo and leaves the same way.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAGIC 0x5ec0c0de0ddba115ULL

enum { NOT_RUN, RETURNED, TRAPPED, THREAD_KILLED, PROCESS_KILLED, DIED, LOAD_FAILED, LOADED };

struct call { uint32_t abi, nr; uint64_t args[6]; };
struct result {
	int32_t status;
	int32_t trap_errno;     /* si_errno: SECCOMP_RET_DATA */
	int32_t trap_syscall;
	uint32_t trap_arch;
	int64_t ret;            /* the syscall's raw return; the wait status if DIED; errno if LOAD_FAILED */
	uint64_t ip;            /* the address after the syscall instruction (set for every call made) */
};
struct shared {
	volatile uint32_t cur;  /* index of the call in progress */
	volatile uint32_t done; /* the worker got through its range */
	struct result res[];
};

static struct sock_fprog prog;
static struct call *calls;
static struct shared *sh;
static uint32_t range_begin, range_end, mode;

static void leave(void)
{
	register uint64_t r10 __asm__("r10") = 0, r8 __asm__("r8") = 0;
	register uint64_t r9 __asm__("r9") = MAGIC;
	for (;;)
		__asm__ volatile("syscall" : : "a"((long)SYS_exit), "D"(0L), "S"(0L), "d"(0L),
				 "r"(r10), "r"(r8), "r"(r9) : "rcx", "r11", "memory");
}

/* The addresses right after the two syscall instructions: seccomp_data's
 * instruction_pointer.  Global labels, so they are known even for a call the
 * filter kills (noclone: one copy of each). */
extern const char pb_after_syscall[], pb_after_int80[];

static __attribute__((noinline, noclone)) int64_t call64(uint32_t nr, const uint64_t *a)
{
	register uint64_t r10 __asm__("r10") = a[3], r8 __asm__("r8") = a[4], r9 __asm__("r9") = a[5];
	int64_t ret;
	__asm__ volatile("syscall\n.globl pb_after_syscall\npb_after_syscall:"
			 : "=a"(ret)
			 : "0"((uint64_t)nr), "D"(a[0]), "S"(a[1]), "d"(a[2]), "r"(r10), "r"(r8), "r"(r9)
			 : "rcx", "r11", "memory");
	return ret;
}

static __attribute__((noinline, noclone)) int64_t call32(uint32_t nr, const uint64_t *a)
{
	uint32_t eax = nr;
	register uint64_t r12 __asm__("r12") = (uint32_t)a[5];
	/* ebx..edi as 32-bit values: the upper halves are zero.  ebp by hand
	 * (it may be the frame pointer); built with -mno-red-zone for the push. */
	__asm__ volatile("push %%rbp\n\tmov %%r12d, %%ebp\n\tint $0x80\n"
			 ".globl pb_after_int80\npb_after_int80:\n\tpop %%rbp"
			 : "+a"(eax)
			 : "b"((uint32_t)a[0]), "c"((uint32_t)a[1]), "d"((uint32_t)a[2]),
			   "S"((uint32_t)a[3]), "D"((uint32_t)a[4]), "r"(r12)
			 : "memory", "r8", "r9", "r10", "r11");
	return (int32_t)eax;
}

static void on_sigsys(int sig, siginfo_t *si, void *uc)
{
	(void)sig; (void)uc;
	if (mode == 2)                /* load only: what the program then does is no matter */
		leave();
	struct result *r = &sh->res[sh->cur];
	r->status = TRAPPED;
	r->trap_errno = si->si_errno;
	r->trap_syscall = si->si_syscall;
	r->trap_arch = si->si_arch;
	leave();
}

static void *worker(void *unused)
{
	(void)unused;
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) ||
	    syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog)) {
		sh->res[range_begin].status = LOAD_FAILED;
		sh->res[range_begin].ret = errno;
		sh->done = 1;
		leave();
	}
	if (mode == 2) {
		sh->res[0].status = LOADED;
		sh->done = 1;
		leave();
	}
	for (uint32_t i = range_begin; i < range_end; i++) {
		struct result *r = &sh->res[i];
		int64_t ret;
		r->ip = (uint64_t)(calls[i].abi == 1 ? pb_after_int80 : pb_after_syscall);
		sh->cur = i;
		__atomic_thread_fence(__ATOMIC_SEQ_CST);
		if (calls[i].abi == 1)
			ret = call32(calls[i].nr, calls[i].args);
		else
			ret = call64(calls[i].nr, calls[i].args);
		r->ret = ret;
		r->status = RETURNED;
		__atomic_thread_fence(__ATOMIC_SEQ_CST);
	}
	sh->cur = range_end;
	sh->done = 1;
	leave();
	return NULL;
}

static void child(void)
{
	struct rlimit no_core = {0, 0};
	setrlimit(RLIMIT_CORE, &no_core);
	prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_sigaction = on_sigsys;
	sa.sa_flags = SA_SIGINFO | SA_NODEFER;
	sigaction(SIGSYS, &sa, NULL);
	pthread_t t;
	if (pthread_create(&t, NULL, worker, NULL))
		_exit(90);
	/* Wait for the worker to finish or die: its exit clears its tid. */
	struct timespec nap = {0, 20000};
	for (long spins = 0; ; spins++) {
		if (sh->done || pthread_tryjoin_np(t, NULL) == 0)
			break;
		if (spins > 500000)          /* ~10 s or more: give up */
			_exit(91);
		nanosleep(&nap, NULL);
	}
	if (!sh->done) {
		uint32_t i = sh->cur;
		if (i < range_end && sh->res[i].status == NOT_RUN)
			sh->res[i].status = THREAD_KILLED;
	}
	_exit(0);
}

static int read_all(void *buf, size_t n)
{
	char *p = buf;
	while (n) {
		ssize_t r = read(0, p, n);
		if (r <= 0)
			return -1;
		p += r;
		n -= (size_t)r;
	}
	return 0;
}

static int write_all(const void *buf, size_t n)
{
	const char *p = buf;
	while (n) {
		ssize_t r = write(1, p, n);
		if (r <= 0)
			return -1;
		p += r;
		n -= (size_t)r;
	}
	return 0;
}

int main(void)
{
	uint32_t ninsns, ncalls;
	if (read_all(&mode, 4) || read_all(&ninsns, 4) || ninsns > 65536)
		return 2;
	struct sock_filter *insns = calloc(ninsns ? ninsns : 1, sizeof *insns);
	if (!insns || read_all(insns, ninsns * sizeof *insns) || read_all(&ncalls, 4))
		return 2;
	calls = calloc(ncalls ? ncalls : 1, sizeof *calls);
	if (!calls || read_all(calls, (size_t)ncalls * sizeof *calls))
		return 2;
	prog.len = (unsigned short)ninsns;
	prog.filter = insns;
	uint32_t nres = mode == 2 ? 1 : ncalls;
	size_t size = sizeof(struct shared) + (size_t)(nres ? nres : 1) * sizeof(struct result);
	sh = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (sh == MAP_FAILED)
		return 2;
	uint32_t i = 0;
	while (i < nres) {
		range_begin = i;
		range_end = mode == 1 ? i + 1 : nres;
		sh->cur = i;
		sh->done = 0;
		pid_t pid = fork();
		if (pid < 0)
			return 3;
		if (pid == 0)
			child();
		int st;
		if (waitpid(pid, &st, 0) != pid)
			return 3;
		uint32_t at = sh->cur;
		if (mode == 2)
			break;
		if (WIFEXITED(st) && WEXITSTATUS(st) == 0) {
			if (sh->done) {
				i = range_end;
			} else {                 /* the worker died on call `at` */
				i = at + 1;
			}
			continue;
		}
		if (WIFEXITED(st))
			return 4;                /* the harness itself failed */
		if (at >= range_end)
			return 5;
		if (WIFSIGNALED(st) && WTERMSIG(st) == SIGSYS) {
			sh->res[at].status = PROCESS_KILLED;
		} else {
			sh->res[at].status = DIED;
			sh->res[at].ret = st;
		}
		i = at + 1;
	}
	return write_all(sh->res, nres * sizeof(struct result)) ? 6 : 0;
}
