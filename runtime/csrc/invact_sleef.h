/* PyTorch's vector math, written once over a vector width: SLEEF's expf, tanhf, logf and log1pf (u10,
 * the FMA builds that ATen's Vectorized<float> calls), ATen's erf, tanh-form GELU and mish. Each
 * follows the instructions libtorch runs, in their order, so a build for 16 lanes (AVX-512:
 * invact_torch_math.h, for cpu_kernels.c) and one for 8 (AVX2 + FMA: cpu_avx2.c) give the bits of
 * libtorch's build for the same ISA. SLEEF's two builds differ only in how logf and log1pf split x
 * into exponent and mantissa and treat special values, which the includer writes: sleef_log_reduce,
 * sleef_log1p_reduce and sleef_log_special (with the width's suffix).
 *
 * The includer defines the vector types VF, VI (32-bit integer lanes) and VM (a lane mask: __mmask16
 * or a compare's all-ones lanes), V_LANES (the names' suffix), V_REG (a vector register's asm
 * constraint) and the operations used below (V_ADD .. V_ANY). */

#define INVACT_CAT_(a, b) a##b
#define INVACT_CAT(a, b) INVACT_CAT_(a, b)
#define WIDE(name) INVACT_CAT(name, V_LANES)

#define V_C(u) V_BITS((int)(u))  /* a float32 bit pattern in every lane */

/* src1 * src2 by one vmulps with the operands in this order: with two NaNs it returns src1's (quieted),
 * and the compiler may swap a product's */
static inline VF mul_src1(VF src1, VF src2) {
    VF r;
    __asm__("vmulps %2, %1, %0" : "=" V_REG(r) : V_REG(src1), V_REG(src2));
    return r;
}

/* p(x) by Horner's rule with FMA, coefficients c[0] (highest degree) .. c[n - 1] */
static inline VF WIDE(horner)(VF x, const float *c, int n) {
    VF p = V_SET(c[0]);
    for (int k = 1; k < n; k++) p = V_FMA(p, x, V_SET(c[k]));
    return p;
}

/* Sleef_expf_u10's polynomial in the reduced argument, highest degree first */
static const float SLEEF_EXP_POLY[] = {0.000198527617612853646278381f, 0.00139304355252534151077271f,
                                       0.00833336077630519866943359f, 0.0416664853692054748535156f,
                                       0.166666671633720397949219f, 0.5f};

/* Sleef_expf_u10 step for step */
static inline VF WIDE(sleef_exp)(VF d) {
    VI q = V_RINT(V_MUL(d, V_SET(1.44269502162933349609375f)));
    VF qf = V_I2F(q);
    VF s = V_FMA(qf, V_SET(-0.693145751953125f), d);
    s = V_FMA(qf, V_SET(-1.428606765330187e-06f), s);
    VF u = WIDE(horner)(s, SLEEF_EXP_POLY, 6);
    u = V_ADD(V_FMA(V_MUL(s, s), u, s), V_SET(1.0f));
    VI half = V_SRAI(q, 1), bias = V_ISET(0x7f);
    u = V_MUL(u, V_ASF(V_SLLI(V_IADD(half, bias), 23)));
    u = V_MUL(u, V_ASF(V_SLLI(V_IADD(V_ISUB(q, half), bias), 23)));
    u = V_SELECT(V_CMP(d, V_SET(-104.0f), _CMP_NLT_UQ), u, V_ZERO);
    return V_SELECT(V_CMP(V_SET(100.0f), d, _CMP_LT_OQ), V_SET(INFINITY), u);
}

/* Abramowitz and Stegun's erf polynomial in t, as ATen's Vectorized<float>::erf (and oneDNN's avx2
 * gelu: the same float32 values) have it, highest degree first */
static const float AS_ERF_POLY[] = {1.061405429f, -1.453152027f, 1.421413741f, -0.284496736f, 0.254829592f};

/* ATen's Vectorized<float>::erf, FMAs where it has them */
static inline VF WIDE(aten_erf)(VF v) {
    VF one = V_SET(1.0f), sign = V_AND(V_SET(-0.0f), v);
    VF t = V_DIV(one, V_FMA(V_SET(0.3275911f), V_ANDNOT(V_SET(-0.0f), v), one));
    VF r = WIDE(horner)(t, AS_ERF_POLY, 5);
    VF e = V_XOR(V_SET(-0.0f), WIDE(sleef_exp)(V_XOR(V_SET(-0.0f), V_MUL(v, v))));
    return V_XOR(sign, V_FMA(V_MUL(e, t), r, one));
}

/* SLEEF's dfadd2 of two floats: a + b rounded, and in *lo its rounding error (two-sum) */
static inline VF WIDE(two_sum)(VF a, VF b, VF *lo) {
    VF s = V_ADD(a, b), v = V_SUB(s, a);
    *lo = V_ADD(V_SUB(a, V_SUB(s, v)), V_SUB(b, v));
    return s;
}

/* SLEEF's tanhf u10: exp(|x|) as a double-float (range reduction by ln 2 in two parts, a polynomial,
 * scaling by 2^q in two halves), then (T - 1/T) / (T + 1/T) in double-float arithmetic; 1 past
 * |x| > 8.66434 (and where that gave NaN), x's sign, all ones for NaN x */
static inline VF WIDE(sleef_tanh)(VF x) {
    const VF zero = V_ZERO, one = V_C(0x3f800000), half = V_C(0x3f000000), negz = V_C(0x80000000);

    /* a = |x|; expk2f(d = (a, 0)) */
    VF a = V_ANDNOT(negz, x);
    VF u = V_MUL(V_ADD(zero, a), V_C(0x3fb8aa3b));       /* (d.x + d.y) * R_LN2f */
    VI q = V_RINT(u);
    VF qf = V_I2F(q);
    VF p1 = V_MUL(qf, V_C(0xbf317200));                  /* q * -L2Uf */
    VF p2 = V_MUL(qf, V_C(0xb5bfbe8e));                  /* q * -L2Lf */

    /* s = dfadd2(dfadd2(d, p1), p2) */
    VF s1y, sy;
    VF s1x = WIDE(two_sum)(a, p1, &s1y);
    s1y = V_ADD(s1y, zero);                              /* + d.y (= 0) */
    VF sx = WIDE(two_sum)(s1x, p2, &sy);
    sy = V_ADD(s1y, sy);

    /* polynomial */
    VF pu = V_FMA(sx, V_C(0x394fb7ff), V_C(0x3ab6bf7c));
    pu = V_FMA(sx, pu, V_C(0x3c08890d));
    pu = V_FMA(sx, pu, V_C(0x3d2aaa5c));

    /* t = dfadd2(dfmul(s, pu), 1/6) */
    VF mx = V_MUL(sx, pu);
    VF my = V_FMS(sx, pu, mx);
    my = V_FMA(sy, pu, my);
    VF ty, tx = WIDE(two_sum)(mx, V_C(0x3e2aaaaa), &ty);
    ty = V_ADD(ty, my);

    /* t2 = dfadd2(dfmul(s, t), 0.5) */
    VF nx = V_MUL(sx, tx);
    VF ny = V_FMS(sx, tx, nx);
    ny = V_FMA(sy, tx, ny);
    ny = V_FMA(ty, sx, ny);
    VF t2y, t2x = WIDE(two_sum)(nx, half, &t2y);
    t2y = V_ADD(t2y, ny);

    /* sq = dfsqu(s) */
    VF sqx = V_MUL(sx, sx);
    VF sqy = V_FMS(sx, sx, sqx);
    sqy = V_FMA(V_ADD(sx, sx), sy, sqy);

    /* w = dfmul(sq, t2) */
    VF wx = V_MUL(t2x, sqx);
    VF wy = V_FMS(sqx, t2x, wx);
    wy = V_FMA(sqy, t2x, wy);
    wy = V_FMA(sqx, t2y, wy);

    /* r = dfadd2(s, w) */
    VF ry, rx = WIDE(two_sum)(sx, wx, &ry);
    ry = V_ADD(ry, V_ADD(sy, wy));

    /* f = dfadd(1, r) */
    VF fx = V_ADD(rx, one);
    VF fy = V_ADD(V_SUB(one, fx), rx);
    fy = V_ADD(ry, fy);

    /* ldexp2 by q; 0 below a < -104 */
    VI h = V_SRAI(q, 1);
    VF A = V_ASF(V_SLLI(V_IADD(h, V_ISET(0x7f)), 23));
    VF B = V_ASF(V_SLLI(V_ISUB(V_IADD(q, V_ISET(0x7f)), h), 23));
    VM under = V_CMP(a, V_C(0xc2d00000), _CMP_LT_OQ);
    VF Tx = V_SELECT(under, zero, V_MUL(V_MUL(fx, A), B));
    VF Ty = V_SELECT(under, zero, V_MUL(V_MUL(fy, A), B));

    /* e = dfrec(T) */
    VF ex = V_DIV(one, Tx);
    VF ev = V_FNMA(Tx, ex, one);
    ev = V_FNMA(Ty, ex, ev);
    VF ey = V_MUL(ex, ev);
    VF nex = V_XOR(ex, negz), ney = V_XOR(ey, negz);

    /* den = dfadd(T, e), num = dfadd(T, -e) */
    VF dx = V_ADD(ex, Tx);
    VF dy = V_ADD(V_SUB(Tx, dx), ex);
    dy = V_ADD(dy, Ty);
    dy = V_ADD(dy, ey);
    VF nmx = V_ADD(nex, Tx);
    VF nmy = V_ADD(V_SUB(Tx, nmx), nex);
    nmy = V_ADD(nmy, Ty);
    nmy = V_ADD(nmy, ney);

    /* dfdiv(num, den) */
    VF rc = V_DIV(one, dx);
    VF S = V_MUL(rc, nmx);
    VF Ulo = V_FMS(rc, nmx, S);
    VF V = V_FNMA(dx, rc, one);
    V = V_FNMA(dy, rc, V);
    VF Wv = V_FMA(nmy, rc, Ulo);
    VF y = V_ADD(S, V_FMA(V, S, Wv));

    VM big = V_MOR(V_CMP(a, V_C(0x410aa123), _CMP_GT_OQ), V_CMP(y, y, _CMP_NEQ_UQ));  /* a > 8.66434, NaN y */
    y = V_SELECT(big, one, y);
    VF r = V_XOR(V_AND(x, negz), y);                     /* mulsign */
    return V_SELECT(V_CMP(x, x, _CMP_NEQ_UQ), V_C(0xffffffff), r);
}

/* ATen's vectorized_gelu_approximated_with_tanh: x^3 = (x x) x, inner = fma(x^3, 0.044715, x) * sqrt(2/pi),
 * y = (x / 2) * (tanh(inner) + 1); its bfloat16/float16 instantiations multiply the other way round
 * (NaN payloads differ) */
static inline VF WIDE(aten_gelu_tanh)(VF x, int low_precision) {
    VF inner = V_FMA(V_MUL(V_MUL(x, x), x), V_C(0x3d372713), x);
    VF t1 = V_ADD(WIDE(sleef_tanh)(V_MUL(inner, V_C(0x3f4c422a))), V_SET(1.0f));
    VF hx = mul_src1(x, V_SET(0.5f));
    return low_precision ? mul_src1(t1, hx) : mul_src1(hx, t1);
}

/* e ln 2 as SLEEF's double-float (sx, *sy) */
static inline VF WIDE(sleef_e_ln2)(VF e, VF *sy) {
    VF sx = V_MUL(e, V_C(0x3f317218));
    *sy = V_FMA(e, V_C(0xb102e308), V_FMS(V_C(0x3f317218), e, sx));
    return sx;
}

/* the tail SLEEF's logf and log1pf share: log = s + 2q + q^3 (c1 + q^2 (c2 + q^2 c3)), with s = (sx, sy)
 * the exponent times ln 2 and q = (qx, q2lo / 2) the reduced quotient as double-floats, summed in
 * their order: (((sx - S) + 2qx) + sy + q2lo) + ((S - R) + p) + R, S = 2qx + sx, R = S + p */
static inline VF WIDE(sleef_log_sum)(VF sx, VF sy, VF qx, VF q2lo) {
    VF x2 = V_MUL(qx, qx), qx2 = V_ADD(qx, qx);
    VF p = V_FMA(x2, V_C(0x3e9aff5c), V_C(0x3ecc99ca));
    p = V_MUL(V_MUL(x2, qx), V_FMA(x2, p, V_C(0x3f2aaada)));
    VF S = V_ADD(qx2, sx), R = V_ADD(S, p);
    VF r = V_ADD(V_ADD(V_ADD(V_SUB(sx, S), qx2), sy), q2lo);
    return V_ADD(V_ADD(r, V_ADD(V_SUB(S, R), p)), R);
}

/* SLEEF's logf of x = m 2^e (m in [0.75, 1.5), e a float), special values aside: q = (m - 1) / (m + 1)
 * by dfdiv of the double-floats m - 1 and m + 1 */
static inline VF WIDE(sleef_log_core)(VF e, VF m) {
    const VF one = V_C(0x3f800000), mone = V_C(0xbf800000);
    VF sy, sx = WIDE(sleef_e_ln2)(e, &sy);
    VF mm1 = V_ADD(m, mone), mp1 = V_ADD(m, one);
    VF mp1b = V_ADD(mm1, one), v = V_ADD(mp1, mone);
    VF rcp = V_DIV(one, mp1);
    VF qx = V_MUL(rcp, mm1);
    VF u = V_FNMA(mp1, rcp, one);
    VF w = V_FMS(rcp, mm1, qx);
    VF den_y = V_ADD(V_SUB(one, V_SUB(mp1, v)), V_SUB(m, v));
    VF num_y = V_ADD(V_SUB(mone, V_SUB(mm1, mp1b)), V_SUB(m, mp1b));
    VF qy = V_FMA(V_FNMA(den_y, rcp, u), qx, V_FMA(num_y, rcp, w));
    return WIDE(sleef_log_sum)(sx, sy, qx, V_ADD(qy, qy));
}

/* Sleef_logf_u10 */
static inline VF WIDE(sleef_log)(VF x) {
    VF e, m;
    WIDE(sleef_log_reduce)(x, &e, &m);
    return WIDE(sleef_log_special)(x, WIDE(sleef_log_core)(e, m));
}

/* Sleef_log1pf_u10: m = fma(2^-e, x, 2^-e - 1) (the includer's sleef_log1p_reduce), m / (m + 2) by
 * dfdiv, summed as logf; lanes with !(x <= 1e38) (incl. NaN, +inf) take logf(x); then x < -1: NaN
 * (all ones), x == -1: -inf, -0: -0 */
static inline VF WIDE(sleef_log1p)(VF x) {
    const VF one = V_C(0x3f800000), mone = V_C(0xbf800000), two = V_C(0x40000000);
    VF e, m;
    WIDE(sleef_log1p_reduce)(x, &e, &m);
    VF sy, sx = WIDE(sleef_e_ln2)(e, &sy);
    VF den = V_ADD(m, two);
    VF rcp = V_DIV(one, den);
    VF u = V_FNMA(den, rcp, one);
    VF qx = V_MUL(rcp, m);
    VF dy = V_FNMA(V_ADD(V_SUB(two, den), m), rcp, u);
    VF w = V_FMA(V_ZERO, rcp, V_FMS(rcp, m, qx));
    VF qy = V_FMA(dy, qx, w);
    VF r = WIDE(sleef_log_sum)(sx, sy, qx, V_ADD(qy, qy));
    VM small = V_CMP(x, V_C(0x7e967699), _CMP_LE_OQ);   /* x <= 1e38 */
    if (!V_ALL(small)) r = V_SELECT(small, r, WIDE(sleef_log)(x));
    r = V_SELECT(V_CMP(mone, x, _CMP_GT_OQ), V_C(0xffffffff), r);
    r = V_SELECT(V_CMP(x, mone, _CMP_EQ_OQ), V_C(0xff800000), r);
    return V_SELECT(V_IEQ(V_ASI(x), V_ISET((int)0x80000000)), V_C(0x80000000), r);
}

/* ATen's mish, x * tanh(log1p(exp(x))), as one vmulps: x's NaN, or tanh's in the lanes tanh_first */
static inline VF WIDE(aten_mish)(VF x, VM tanh_first) {
    VF t = WIDE(sleef_tanh)(WIDE(sleef_log1p)(WIDE(sleef_exp)(x)));
    VF y = mul_src1(x, t);
    return V_ANY(tanh_first) ? V_SELECT(tanh_first, mul_src1(t, x), y) : y;
}

#undef V_C
