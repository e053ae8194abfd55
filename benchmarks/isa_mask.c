/* Hide AVX-512 (and AVX-VNNI, AMX) from a process, so that the libraries in it pick the AVX2 + FMA kernels
 * they would pick on an AVX2-only CPU such as CI's AMD EPYC family 25 model 1: YNNPACK and XLA's code
 * generation in JAX, MKL and oneDNN in PyTorch all choose kernels from what CPUID reports.
 *
 * Loaded with LD_PRELOAD (benchmarks/machine.py's `isa_env("avx2")` builds and names it). Its constructor
 * makes the CPUID instruction fault in this thread and every thread or child it creates (Linux's
 * arch_prctl(ARCH_SET_CPUID, 0); the CPU or hypervisor must offer CPUID faulting: flag `cpuid_fault` in
 * /proc/cpuinfo). Each fault runs CPUID for real, clears the feature bits below and resumes after the
 * instruction. Code compiled for AVX-512 ahead of time (llama.cpp built with -march=native) still runs it.
 *
 * A SIGSEGV handler installed later through sigaction() is kept and called for every fault that is not a
 * CPUID, so Python's faulthandler and the like still work. ISA_MASK_VERBOSE=1 prints the number of CPUID
 * calls answered when the process exits. */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define BIT(n) (1u << (n))

typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);

static volatile long answered;
static int installed;
static struct sigaction chained; /* the program's own SIGSEGV handler, if it sets one */

static sigaction_fn real_sigaction(void) {
    static sigaction_fn real;
    if (!real) real = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    return real;
}

static long cpuid_faulting(int off) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, !off); }

/* Leaf 7 subleaf 0: EBX AVX512F, DQ, IFMA, PF, ER, CD, BW, VL; ECX AVX512_VBMI, VBMI2, VNNI, BITALG,
 * VPOPCNTDQ; EDX 4VNNIW, 4FMAPS, VP2INTERSECT, AMX-BF16, AVX512_FP16, AMX-TILE, AMX-INT8. Leaf 7 subleaf 1:
 * EAX AVX-VNNI, AVX512_BF16. Leaf 0xD subleaf 0: the opmask / ZMM state components of XCR0. */
static void clear_bits(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    if (leaf == 7 && sub == 0) {
        r[1] &= ~(BIT(16) | BIT(17) | BIT(21) | BIT(26) | BIT(27) | BIT(28) | BIT(30) | BIT(31));
        r[2] &= ~(BIT(1) | BIT(6) | BIT(11) | BIT(12) | BIT(14));
        r[3] &= ~(BIT(2) | BIT(3) | BIT(8) | BIT(22) | BIT(23) | BIT(24) | BIT(25));
    } else if (leaf == 7 && sub == 1) {
        r[0] &= ~(BIT(4) | BIT(5));
    } else if (leaf == 0xd && sub == 0) {
        r[0] &= ~(BIT(5) | BIT(6) | BIT(7));
    }
}

static void on_fault(int sig, siginfo_t *info, void *context) {
    greg_t *reg = ((ucontext_t *)context)->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)reg[REG_RIP];
    if (ip[0] == 0x0f && ip[1] == 0xa2) { /* CPUID */
        uint32_t leaf = (uint32_t)reg[REG_RAX], sub = (uint32_t)reg[REG_RCX], r[4];
        cpuid_faulting(0);
        __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
        cpuid_faulting(1);
        clear_bits(leaf, sub, r);
        reg[REG_RAX] = r[0], reg[REG_RBX] = r[1], reg[REG_RCX] = r[2], reg[REG_RDX] = r[3];
        reg[REG_RIP] += 2;
        answered++;
        return;
    }
    if (chained.sa_flags & SA_SIGINFO) {
        chained.sa_sigaction(sig, info, context);
    } else if (chained.sa_handler != SIG_DFL && chained.sa_handler != SIG_IGN) {
        chained.sa_handler(sig);
    } else { /* a real fault: the default action when the instruction runs again */
        struct sigaction dfl = {0};
        dfl.sa_handler = SIG_DFL;
        real_sigaction()(SIGSEGV, &dfl, NULL);
    }
}

/* Keep our handler first: a SIGSEGV handler the program installs becomes the chained one. */
int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    if (sig != SIGSEGV || !installed) return real_sigaction()(sig, act, old);
    if (old) *old = chained;
    if (act) chained = *act;
    return 0;
}

__attribute__((constructor)) static void install(void) {
    struct sigaction sa = {0};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    chained.sa_handler = SIG_DFL;
    if (real_sigaction()(SIGSEGV, &sa, NULL) != 0 || cpuid_faulting(1) != 0) {
        perror("isa_mask: cannot make CPUID fault (arch_prctl ARCH_SET_CPUID; needs flag cpuid_fault)");
        _exit(3);
    }
    installed = 1;
}

__attribute__((destructor)) static void report(void) {
    if (getenv("ISA_MASK_VERBOSE")) fprintf(stderr, "isa_mask: %ld CPUID calls answered\n", answered);
}
