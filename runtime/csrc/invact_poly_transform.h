/* The transforms of the polynomial kernels, one definition for both: shifted, root (sqrt), log32
 * (invact.fastmath.log, operation for operation) and transform(t, i, y, out), over U vectors. Each
 * kernel includes this after defining U, EACH, at_least and its vector layer (VF, VI, VM and the
 * V_* operations of invact_sleef.h: invact_torch_math.h for AVX-512, cpu_avx2.c for AVX2). */
#ifndef INVACT_POLY_TRANSFORM_H
#define INVACT_POLY_TRANSFORM_H

/* invact.fastmath.log: exponent plus a polynomial in the mantissa, operation for operation */
static __attribute__((noinline)) void log32(const invact_table *t, const VF a[U], VF out[U]) {
    VF e[U], f[U], z[U], p[U];
    EACH(v) {
        VI bits = V_ASI(a[v]);
        VF m = V_ASF(V_IOR(V_IAND(bits, V_ISET(0x7FFFFF)), V_ISET(0x3F800000)));
        VM big = V_CMP(m, V_SET(t->sqrt2), _CMP_GE_OQ);
        VI ei = V_ISUB(V_SRAI(bits, 23), V_ISET(127));
        e[v] = V_I2F(V_ISELECT(big, V_IADD(ei, V_ISET(1)), ei));
        f[v] = V_SUB(V_SELECT(big, V_MUL(m, V_SET(0.5f)), m), V_SET(1.0f));
        z[v] = V_MUL(f[v], f[v]);
        p[v] = V_SET(t->log_poly[0]);
    }
    for (int k = 1; k < LOG_TERMS; k++) {
        VF c = V_SET(t->log_poly[k]);
        EACH(v) p[v] = V_ADD(V_MUL(p[v], f[v]), c);
    }
    EACH(v) {
        VF r = V_MUL(V_MUL(f[v], z[v]), p[v]);
        r = V_ADD(r, V_MUL(e[v], V_SET(t->ln2_lo)));
        r = V_SUB(r, V_MUL(V_SET(0.5f), z[v]));
        out[v] = V_ADD(V_ADD(f[v], r), V_MUL(e[v], V_SET(t->ln2_hi)));
    }
}

/* d = sign * (((y - o0) - o1) - o2), transform i's steps before its sqrt or log: every part subtracted
 * and the sign always applied, a zero part (as +0: -0 - +0 is -0, so d is unchanged, NaN and flushed
 * denormals alike) and a positive sign (an xor with 0) included. A branch per part, as before, kept
 * y's vectors out of registers (spilled around the transform): ~17 % of silu's AVX-512 kernel in cache */
static inline __attribute__((always_inline)) void shifted(const invact_table *t, int i, const VF y[U], VF d[U]) {
    EACH(v) d[v] = y[v];
    for (int k = 0; k < 3; k++)
        EACH(v) d[v] = V_SUB(d[v], V_SET(t->transform_origin[i][k] + 0.0f));
    VF flip = V_BITS(t->transform_sign[i] < 0.0f ? (int)0x80000000u : 0);
    EACH(v) d[v] = V_XOR(d[v], flip);
}

/* transform i (a SQRT one) of y */
static inline __attribute__((always_inline)) void root(const invact_table *t, int i, const VF y[U], VF out[U]) {
    VF d[U];
    shifted(t, i, y, d);
    EACH(v) out[v] = V_SQRT(at_least(d[v], 0.0f));
}

/* transform i of U vectors of y (identity, sqrt or log) */
static inline __attribute__((always_inline)) void transform(const invact_table *t, int i, const VF y[U], VF out[U]) {
    int kind = t->transform_kind[i];
    if (kind == IDENTITY) {
        EACH(v) out[v] = y[v];
        return;
    }
    if (kind == SQRT) {
        root(t, i, y, out);
        return;
    }
    VF d[U];
    shifted(t, i, y, d);
    EACH(v) d[v] = at_least(d[v], t->tiny);
    log32(t, d, out);
}

#endif
