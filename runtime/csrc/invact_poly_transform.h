/* transform(t, i, y, out): transform i of U vectors of y (identity, sqrt or log), one definition for
 * both polynomial kernels. Each includes this after defining its vector type `vf`, U and EACH, and
 * at_least, shifted, root and log32 on those vectors (cpu_kernels.c for AVX-512, cpu_avx2.c for AVX2). */
#ifndef INVACT_POLY_TRANSFORM_H
#define INVACT_POLY_TRANSFORM_H

static inline __attribute__((always_inline)) void transform(const invact_table *t, int i, const vf y[U], vf out[U]) {
    int kind = t->transform_kind[i];
    if (kind == IDENTITY) {
        EACH(v) out[v] = y[v];
        return;
    }
    if (kind == SQRT) {
        root(t, i, y, out);
        return;
    }
    vf d[U];
    shifted(t, i, y, d);
    EACH(v) d[v] = at_least(d[v], t->tiny);
    log32(t, d, out);
}

#endif
