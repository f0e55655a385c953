/*
 * fsbase-probe: a guest /init that forks and execs static and dynamic programs thousands of times and
 * checks, in every process, that the FS base in effect is the process's own.
 *
 * Why: on hosts whose KVM is software (kvm_pvm), guest user mode runs natively and the FS base the
 * guest kernel sets for a task must reach the CPU. When it does not, the task's first thread-local
 * access (glibc and busybox: `mov %fs:OFF, ...`) reads another task's memory, and the task usually
 * dies with SIGSEGV. This program counts such faults and, in every process, compares three views:
 *   - what the guest kernel says (arch_prctl(ARCH_GET_FS)),
 *   - what the TLS itself says (glibc keeps the thread pointer at %fs:0),
 *   - what the CPU has (RDFSBASE, when the host lets guest user mode run it; else not compared).
 *
 * Usage (as PID 1): the kernel passes unknown `NAME=VALUE` arguments to init as its environment, so
 * the command line sets PROBE_ROUNDS (default 100), PROBE_WORKERS (processes started at once per
 * round, default 8), PROBE_CHECKS (checks per process, default 20) and PROBE_SPAWN (0: every way in
 * turn, the default; 1: fork + exec only; 2: posix_spawn only).
 * Children are `/probe-static child CHECKS` and `/probe-dynamic child CHECKS`, started by fork + exec
 * or posix_spawn, and busybox shells (`/bin/sh`) that fork for command substitutions, while a second
 * thread of PID 1 keeps checking its own FS base.
 * Output lines start with `PROBE`; the last is
 *   PROBE-RESULT processes=N faults=F mismatches=M rdfsbase=yes|no
 * then the guest powers off through a reboot (the VM ends as a reset).
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <spawn.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define MISMATCH_EXIT 42
/* Processes each started program forks (cheaper than exec, so they make up the count). */
#define FORKS_PER_CHILD 3
/* The most workers per round. */
#define MAX_WORKERS 64

extern char **environ;

static sigjmp_buf probe_jmp;

static void on_sigill(int sig) {
	(void)sig;
	siglongjmp(probe_jmp, 1);
}

/* Whether RDFSBASE runs in this process (CR4.FSGSBASE on the CPU that runs guest user mode). */
static int rdfsbase_works(void) {
	struct sigaction sa = {0}, old;
	volatile int ok = 0;
	sa.sa_handler = on_sigill;
	sigaction(SIGILL, &sa, &old);
	sigaction(SIGSEGV, &sa, NULL);
	if (sigsetjmp(probe_jmp, 1) == 0) {
		uint64_t v;
		__asm__ volatile("rdfsbase %0" : "=r"(v));
		ok = 1;
	}
	sigaction(SIGILL, &old, NULL);
	signal(SIGSEGV, SIG_DFL);
	return ok;
}

static uint64_t read_rdfsbase(void) {
	uint64_t v;
	__asm__ volatile("rdfsbase %0" : "=r"(v));
	return v;
}

static uint64_t read_fs0(void) {
	uint64_t v;
	__asm__ volatile("mov %%fs:0, %0" : "=r"(v));
	return v;
}

static uint64_t kernel_fsbase(void) {
	uint64_t v = 0;
	syscall(SYS_arch_prctl, ARCH_GET_FS, &v);
	return v;
}

static unsigned current_cpu(void) {
	unsigned cpu = 0;
	syscall(SYS_getcpu, &cpu, NULL, NULL);
	return cpu;
}

/*
 * A thread-local value only this thread wrote: it reads back wrong when the FS base or the mapping
 * of the TLS page is not this thread's (the faults seen read 0 from thread-local storage).
 */
static __thread volatile uint64_t tls_canary;

static uint64_t canary_for(void) {
	return 0x1900000000000000ull ^ ((uint64_t)getpid() << 20) ^ (uint64_t)syscall(SYS_gettid);
}

/* One check: returns 0 when all views agree, else prints them and returns 1. */
static int check(int hw, int i) {
	uint64_t k = kernel_fsbase();
	uint64_t t = read_fs0();
	uint64_t h = hw ? read_rdfsbase() : k;
	uint64_t want = canary_for();
	if (tls_canary == 0)
		tls_canary = want;
	uint64_t c = tls_canary;
	if (k == t && h == k && c == want)
		return 0;
	printf("PROBE-MISMATCH pid=%d check=%d cpu=%u kernel=%#lx tls=%#lx cpu_fsbase=%#lx canary=%#lx want=%#lx\n",
	       getpid(), i, current_cpu(), (unsigned long)k, (unsigned long)t, (unsigned long)h, (unsigned long)c,
	       (unsigned long)want);
	fflush(stdout);
	return 1;
}

/* A child: checks its FS base many times, yielding the CPU in between so it migrates and is switched. */
static int child(int checks) {
	int hw = rdfsbase_works();
	for (int i = 0; i < checks; i++) {
		if (check(hw, i))
			return MISMATCH_EXIT;
		if (i % 4 == 0)
			sched_yield();
		else
			getppid();
	}
	/* Forked children of the child too, one after the other: the FS base is inherited, then checked. */
	for (int f = 0; f < FORKS_PER_CHILD; f++) {
		pid_t pid = fork();
		if (pid == 0) {
			tls_canary = 0; /* the parent's, copied by fork: this process writes its own */
			_exit(check(hw, -1) ? MISMATCH_EXIT : 0);
		}
		int status = 0;
		waitpid(pid, &status, 0);
		if (WIFSIGNALED(status))
			return 128 + WTERMSIG(status);
		if (WEXITSTATUS(status) != 0)
			return WEXITSTATUS(status);
	}
	return 0;
}

/*
 * A second thread of PID 1, doing system calls and checking its own FS base on whichever vCPU it
 * is on while the main thread starts processes: ignite-init and the guest agent are multi-threaded
 * programs that start processes the same way.
 */
static volatile int spinning = 1;
static volatile long spinner_mismatches = 0;

static void *spinner(void *arg) {
	int hw = *(int *)arg;
	for (long i = 0; spinning; i++) {
		if (check(hw, (int)i))
			spinner_mismatches++;
		/* Wakes 50 times a second on whichever vCPU is free: a timer wakeup costs thousands of
		 * emulated instructions, so more often would slow the probe itself down. */
		usleep(20000);
	}
	return NULL;
}

/* How a worker starts: fork + exec, posix_spawn (CLONE_VM | CLONE_VFORK), or a busybox shell that
 * forks a subshell for a command substitution, as `sh -c "x=$(echo hi)"` does. */
static long spawn_mode; /* PROBE_SPAWN: 0 every way in turn, 1 fork + exec only, 2 posix_spawn only */

static pid_t start_worker(long w, const char *checks_arg) {
	const char *prog = (w % 2) ? "/probe-dynamic" : "/probe-static";
	pid_t pid = 0;
	switch (spawn_mode == 1 ? 0 : spawn_mode == 2 ? 2 : w % 4) {
	case 0:
	case 1:
		pid = fork();
		if (pid == 0) {
			execl(prog, prog, "child", checks_arg, (char *)NULL);
			printf("PROBE-EXEC-FAILED %s: %s\n", prog, strerror(errno));
			_exit(127);
		}
		return pid;
	case 2: {
		char *argv[] = {(char *)prog, "child", (char *)checks_arg, NULL};
		int rc = posix_spawn(&pid, prog, NULL, NULL, argv, environ);
		if (rc != 0) {
			printf("PROBE-EXEC-FAILED posix_spawn %s: %s\n", prog, strerror(rc));
			return -1;
		}
		return pid;
	}
	default: {
		char *argv[] = {"/bin/sh", "-c", "x=$(echo hi); y=$(echo $x); [ \"$y\" = hi ]", NULL};
		int rc = posix_spawn(&pid, "/bin/sh", NULL, NULL, argv, environ);
		if (rc != 0) {
			printf("PROBE-EXEC-FAILED posix_spawn /bin/sh: %s\n", strerror(rc));
			return -1;
		}
		return pid;
	}
	}
}

static long env_or(const char *name, long def) {
	const char *v = getenv(name);
	return v && *v ? strtol(v, NULL, 10) : def;
}

int main(int argc, char **argv) {
	if (argc > 1 && strcmp(argv[1], "child") == 0)
		return child(argc > 2 ? (int)strtol(argv[2], NULL, 10) : 20);

	/* PID 1: stdio on the console. */
	int fd = open("/dev/console", O_RDWR);
	if (fd >= 0) {
		dup2(fd, 0);
		dup2(fd, 1);
		dup2(fd, 2);
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	mkdir("/proc", 0555);
	mount("proc", "/proc", "proc", 0, NULL);
	if (getenv("PROBE_IDLE")) {
		/* A mostly idle guest with a timer, as a neighbour VM for the probe: wakes every 10 ms. */
		printf("PROBE-IDLE\n");
		for (;;)
			usleep(10000);
	}
	long rounds = env_or("PROBE_ROUNDS", 100);
	spawn_mode = env_or("PROBE_SPAWN", 0);
	long workers = env_or("PROBE_WORKERS", 8);
	if (workers < 1 || workers > MAX_WORKERS)
		workers = 8;
	long checks = env_or("PROBE_CHECKS", 20);
	int hw = rdfsbase_works();
	printf("PROBE-START rounds=%ld workers=%ld checks=%ld cpus=%ld rdfsbase=%s\n", rounds, workers, checks,
	       sysconf(_SC_NPROCESSORS_ONLN), hw ? "yes" : "no");

	long processes = 0, faults = 0, mismatches = 0;
	char checks_arg[16];
	snprintf(checks_arg, sizeof checks_arg, "%ld", checks);
	pthread_t spin;
	pthread_create(&spin, NULL, spinner, &hw);
	for (long r = 0; r < rounds; r++) {
		long started = 0;
		pid_t kinds[MAX_WORKERS][2]; /* pid, kind (w % 4) */
		for (long w = 0; w < workers; w++) {
			pid_t pid = start_worker(w, checks_arg);
			if (pid > 0) {
				kinds[started][0] = pid;
				kinds[started][1] = (pid_t)(w % 4);
				started++;
			}
		}
		for (long w = 0; w < started; w++) {
			int status = 0;
			pid_t pid = wait(&status);
			if (pid < 0)
				break;
			/* The started program and its forks; a shell worker forks two subshells. */
			int shell = 0;
			for (long k = 0; k < started; k++)
				shell |= kinds[k][0] == pid && kinds[k][1] == 3;
			processes += shell ? 3 : 1 + FORKS_PER_CHILD;
			if (WIFSIGNALED(status)) {
				faults++;
				printf("PROBE-FAULT pid=%d signal=%d\n", pid, WTERMSIG(status));
			} else if (WEXITSTATUS(status) == MISMATCH_EXIT) {
				mismatches++;
			} else if (WEXITSTATUS(status) > 128) {
				faults++;
				printf("PROBE-FAULT pid=%d child signal=%d\n", pid, WEXITSTATUS(status) - 128);
			} else if (WEXITSTATUS(status) != 0) {
				faults++;
				printf("PROBE-FAULT pid=%d exit=%d\n", pid, WEXITSTATUS(status));
			}
		}
		if ((r + 1) % 10 == 0)
			printf("PROBE-PROGRESS round=%ld processes=%ld faults=%ld mismatches=%ld\n", r + 1, processes,
			       faults, mismatches + spinner_mismatches);
	}
	spinning = 0;
	pthread_join(spin, NULL);
	mismatches += spinner_mismatches;
	printf("PROBE-RESULT processes=%ld faults=%ld mismatches=%ld rdfsbase=%s\n", processes, faults, mismatches,
	       hw ? "yes" : "no");
	sync();
	reboot(RB_AUTOBOOT);
	return 0;
}
