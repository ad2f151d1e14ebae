/* The forward code's jobs, shared by cpu_kernels.c (AVX-512) and the per-table kernels
 * (invact_table.h, portable): the code of each x (the interval between the x thresholds), packed in
 * invact.bitpack's planes, its bytes split over threads. */
#ifndef INVACT_PACK_H
#define INVACT_PACK_H

#include <string.h>

#include "invact_threads.h"

#define MAX_X_THRESHOLDS 15

typedef struct {
    int dtype, bits, n_thr, nan_code, strict;
    int64_t n, nbytes, lo, hi;          /* all elements, bytes of the packed code, this job's bytes */
    const void *x;
    uint8_t *packed;
    float thr[MAX_X_THRESHOLDS];        /* ascending; passed where `x > t` (bit j of strict) or `x >= t` */
    int32_t codes[MAX_X_THRESHOLDS + 1]; /* code of the interval with k thresholds passed */
    void *y;                            /* a forward's y (cpu_kernels.c's invact_forward_code), else 0 */
    int kind;                           /* that forward's formula */
    int64_t chunk;                      /* the length of ATen's ranges of that forward (its threads') */
} code_job;

/* packed[0 .. nbytes) = the codes of n contiguous x of dtype 0 (float32), 1 (bfloat16) or 2 (float16),
 * every byte written (unused bits 0), by run(code_job *) over the bytes' ranges. thr: n_thr ascending
 * thresholds, passed where `x > t` (bit j of strict set) or `x >= t`; codes[k]: the code where k of
 * them are passed; nan_code: the code of NaN. With y (forward_jobs), run also writes y[0 .. n) by the
 * formula `kind`. Returns 0, or -1 for arguments it does not take. */
static int forward_jobs(void *(*run)(void *), int dtype, int64_t n, const void *x, int n_thr, const float *thr,
                        int strict, const int32_t *codes, int nan_code, int bits, uint8_t *packed, int threads,
                        void *y, int kind, int64_t chunk) {
    if (dtype < 0 || dtype > 2 || n < 0 || n_thr < 0 || n_thr > MAX_X_THRESHOLDS ||
        (bits != 1 && bits != 2 && bits != 4 && bits != 8))
        return -1;
    int per = 8 / bits;
    int64_t nbytes = (n + per - 1) / per, step;
    int nt = split(nbytes, MIN_PER_THREAD / per, threads, &step);
    code_job jobs[MAX_THREADS];
    for (int k = 0; k < nt; k++) {
        code_job *jb = &jobs[k];
        *jb = (code_job){dtype, bits, n_thr, nan_code, strict, n, nbytes, 0, 0, x, packed, {0}, {0},
                         y, kind, chunk};
        jb->lo = clamp_to(k * step, nbytes);
        jb->hi = clamp_to(jb->lo + step, nbytes);
        memcpy(jb->thr, thr, sizeof(float) * (size_t)n_thr);
        memcpy(jb->codes, codes, sizeof(int32_t) * (size_t)(n_thr + 1));
    }
    spawn(run, jobs, sizeof(code_job), nt);
    return 0;
}

/* the code alone: forward_jobs without a y */
static int pack_jobs(void *(*run)(void *), int dtype, int64_t n, const void *x, int n_thr, const float *thr,
                     int strict, const int32_t *codes, int nan_code, int bits, uint8_t *packed, int threads) {
    return forward_jobs(run, dtype, n, x, n_thr, thr, strict, codes, nan_code, bits, packed, threads, 0, 0, 0);
}

#endif
