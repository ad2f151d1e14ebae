/* Splitting element-wise work over pthreads: shared by cpu_kernels.c and the per-table kernels
 * (invact_table.h). Each range is a whole number of 16-element vectors. */
#ifndef INVACT_THREADS_H
#define INVACT_THREADS_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#define MAX_THREADS 256
#define MIN_PER_THREAD 32768

static inline int64_t clamp_to(int64_t v, int64_t most) { return v < most ? v : most; }

/* this thread's buffer of `size` bytes (one size per source file), allocated at its first call and kept
 * (a fresh one per call faulted its pages in every time, ~0.1 ms at 2^22), freed when the thread exits
 * (the pthread spawn's threads, a Python thread per task); NULL where it cannot be had */
static pthread_key_t buffer_key;
static pthread_once_t buffer_once = PTHREAD_ONCE_INIT;
static int buffer_keyed;
static inline void make_buffer_key(void) { buffer_keyed = pthread_key_create(&buffer_key, free) == 0; }
static inline void *thread_buffer(size_t size) {
    static __thread void *buffer;
    if (buffer) return buffer;
    pthread_once(&buffer_once, make_buffer_key);
    if (!buffer_keyed || !(buffer = malloc(size))) return NULL;
    if (pthread_setspecific(buffer_key, buffer) != 0) {
        free(buffer);
        buffer = NULL;
    }
    return buffer;
}

/* the number of threads for `units` of work (at most `threads`, each given at least `min_units`),
 * and in *step the size of each one's range, in whole 16-unit vectors */
static int split(int64_t units, int64_t min_units, int threads, int64_t *step) {
    int64_t most = units / min_units;
    int nt = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    if (most < nt) nt = most < 1 ? 1 : (int)most;
    *step = ((units + nt - 1) / nt + 15) / 16 * 16;
    return nt;
}

#ifdef _OPENMP
#include <omp.h>

/* the floating-point environment that flushing denormals sets: MXCSR on x86, fenv elsewhere */
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
typedef unsigned fp_env;
static inline fp_env fp_env_get(void) { return _mm_getcsr(); }
static inline void fp_env_set(fp_env e) { _mm_setcsr(e); }
#else
#include <fenv.h>
typedef fenv_t fp_env;
static inline fp_env fp_env_get(void) {
    fenv_t e;
    fegetenv(&e);
    return e;
}
static inline void fp_env_set(fp_env e) { fesetenv(&e); }
#endif

/* fn on jobs[0 .. nt) (`size` bytes apart) in one OpenMP parallel region: with the OpenMP runtime
 * that PyTorch loaded (the same libgomp, matched by its soname), its intra-op worker threads, which
 * spin for a while after ATen's own parallel loops, take the jobs at once. Each worker runs with this
 * thread's floating-point environment (flushed denormals, rounding), its own restored after. Where
 * the runtime gives fewer threads than jobs, the jobs are dealt out to those it gave. */
static void spawn(void *(*fn)(void *), void *jobs, size_t size, int nt) {
    if (nt <= 1) {
        fn(jobs);
        return;
    }
    fp_env caller = fp_env_get();
#pragma omp parallel num_threads(nt)
    {
        fp_env own = fp_env_get();
        fp_env_set(caller);
        int k = omp_get_thread_num(), got = omp_get_num_threads();
        for (int j = k; j < nt; j += got) fn((char *)jobs + j * size);
        fp_env_set(own);
    }
}
#else
/* fn on jobs[0 .. nt) (`size` bytes apart): jobs 1 .. on new threads, job 0 (and any whose thread
 * could not start) on this one. New threads inherit this one's floating-point environment
 * (flushed denormals included). */
static void spawn(void *(*fn)(void *), void *jobs, size_t size, int nt) {
    pthread_t ids[MAX_THREADS];
    int started = 0;
    for (int k = 1; k < nt; k++) {
        if (pthread_create(&ids[k], 0, fn, (char *)jobs + k * size) != 0) break;
        started = k;
    }
    fn(jobs);
    for (int k = started + 1; k < nt; k++) fn((char *)jobs + k * size);
    for (int k = 1; k <= started; k++) pthread_join(ids[k], 0);
}
#endif

#endif
