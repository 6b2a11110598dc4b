/* Per-core throughput of the AVX2 multiply-add chains an fp32, W8A16 or W8A8 GEMM inner loop
 * would issue, each as six independent accumulator chains (enough to hide the latencies), so
 * the number is the issue rate of the instructions, not their latency.  Built and timed by
 * benchmarks/bench_isa_peak.py; operands are registers only (no memory traffic). */
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#define SIX(M) M(0, 6) M(1, 7) M(2, 8) M(3, 9) M(4, 10) M(5, 11)
#define CLOBBER "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", \
                "xmm9", "xmm10", "xmm11", "xmm12", "xmm13"

/* fp32: one vfmadd231ps = 8 multiply-adds (twelve chains: its latency is five cycles). */
#define FMA(j, a) "vfmadd231ps %%ymm14, %%ymm15, %%ymm" #j "\n vfmadd231ps %%ymm14, %%ymm15, %%ymm" #a "\n"
/* W8A16: vpmaddwd (16 s16 x s16 products summed in pairs into 8 s32) + vpaddd = 16. */
#define WD(j, a) "vpmaddwd %%ymm14, %%ymm15, %%ymm" #j "\n vpaddd %%ymm" #j ", %%ymm" #a ", %%ymm" #a "\n"
/* W8A8 exact: vpmaddubsw (32 u8 x s8 products summed in pairs into 16 s16), widened by
 * vpmaddwd with ones, vpaddd into s32 = 32. */
#define UB(j, a) "vpmaddubsw %%ymm14, %%ymm15, %%ymm" #j "\n vpmaddwd %%ymm" #j ", %%ymm13, %%ymm" #j \
              "\n vpaddd %%ymm" #j ", %%ymm" #a ", %%ymm" #a "\n"
/* W8A8 with two products summed in s16 before widening (needs 7-bit operands so that four
 * products fit in s16) = 64. */
#define UB2(j, a) "vpmaddubsw %%ymm14, %%ymm15, %%ymm" #j "\n vpmaddubsw %%ymm15, %%ymm14, %%ymm12\n" \
               " vpaddw %%ymm12, %%ymm" #j ", %%ymm" #j "\n vpmaddwd %%ymm" #j ", %%ymm13, %%ymm" #j \
               "\n vpaddd %%ymm" #j ", %%ymm" #a ", %%ymm" #a "\n"

typedef float v8sf __attribute__((vector_size(32)));

/* Returns seconds for `iters` iterations of the chains of the kind named by `kind`
 * (0 fp32, 1 W8A16, 2 W8A8 exact, 3 W8A8 7-bit).  The integer operands' values do not change
 * the timing; the fp32 ones are normal numbers so that no denormal assist is timed. */
double isa_peak_seconds(int kind, long iters) {
    register v8sf x __asm__("ymm14") = {0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f};
    register v8sf y __asm__("ymm15") = x;
    __asm__ volatile("vxorps %%ymm0, %%ymm0, %%ymm0\n" ::: "xmm0");
    double start = now();
    for (long i = 0; i < iters; i++) {
        switch (kind) {
        case 0: __asm__ volatile(SIX(FMA) :: "x"(x), "x"(y) : CLOBBER); break;
        case 1: __asm__ volatile(SIX(WD) :: "x"(x), "x"(y) : CLOBBER); break;
        case 2: __asm__ volatile(SIX(UB) :: "x"(x), "x"(y) : CLOBBER); break;
        default: __asm__ volatile(SIX(UB2) :: "x"(x), "x"(y) : CLOBBER); break;
        }
    }
    return now() - start;
}
