/* The polynomial backward's table (invact_table, mirrored by invact.cpu_kernel.Table) and what every
 * build of that kernel reads off it: shared by cpu_kernels.c (AVX-512) and cpu_avx2.c (AVX2 + FMA). */
#ifndef INVACT_POLY_H
#define INVACT_POLY_H

#include <stdint.h>

#define ABI_VERSION 8
#define MAX_SEGMENTS 32
#define MAX_COLUMNS 48
#define MAX_CLASSES 16
#define MAX_TRANSFORMS 4
#define LOG_TERMS 9
#define MAX_LEVELS 5                                  /* a binary search over up to 32 slots */
#define BY_CODE 32                                    /* by-code tables: codes 0..15, then past 15 */

enum { IDENTITY = 0, SQRT = 1, LOG = 2 };       /* transform kinds */
enum { F32 = 0, BF16 = 1, F16 = 2 };            /* element types of y, grad and out */
enum { COL_TID = 0, COL_CENTER = 1, COL_SCALE = 2, COL_C0_HI = 3, COL_C0_LO = 4 };  /* c_j: 4 + j */

typedef struct {
    int32_t n_classes, degree, n_transforms;
    int32_t class_code[MAX_CLASSES], class_first[MAX_CLASSES], class_count[MAX_CLASSES],
        class_threshold[MAX_CLASSES];
    int32_t transform_kind[MAX_TRANSFORMS];
    float transform_sign[MAX_TRANSFORMS];
    float transform_origin[MAX_TRANSFORMS][3];
    float thresholds[MAX_SEGMENTS];           /* concatenated class by class: passed where */
    int32_t strict[MAX_SEGMENTS];             /* `y > t` (strict: a left-side break), else `y >= t` */
    float columns[MAX_COLUMNS][MAX_SEGMENTS];  /* POLY transposed: column j of segment s */
    float log_poly[LOG_TERMS], ln2_hi, ln2_lo, sqrt2, tiny; /* invact.fastmath's float32 log */
    /* the segment index by binary search (search_levels > 0; columns then by slot, not by row): each
     * class owns 2^levels slots from slot_of_code[min(its code, 16)] (16: codes past 15, which no class
     * has), its segments first; level l adds 2^(levels - 1 - l) to the slot s where y >= level_thr[l][s]
     * (invact.cpu_kernel.search_layout) */
    int32_t search_levels;
    int32_t slot_of_code[BY_CODE];
    float level_thr[MAX_LEVELS][MAX_SEGMENTS];
    /* the sides of u's clamp to [-1, 1] that some float32 y reaches (invact.u_clamp: 1 below, 2 above);
     * where none is, the clamp would return its operand for every y, and is left out */
    int32_t clamp_sides;
} invact_table;

/* whether g must be set to y for NaN y: a log transform (whose exponent and mantissa arithmetic
 * makes a NaN finite) or a negative sign (which flips the NaN's sign bit). Elsewhere every step
 * returns its NaN operand's bits (quieted): the subtractions, vmaxps/vminps (whose second operand is
 * y's), sqrt, and the multiply-adds whose only NaN operand is u, so g is y quieted and g * grad is
 * y * grad's bits, the product with g = y */
static int nan_blend(const invact_table *t) {
    for (int i = 0; i < t->n_transforms; i++)
        if (t->transform_kind[i] == LOG || t->transform_sign[i] < 0.0f) return 1;
    return 0;
}

/* one past the largest segment index the kernel forms: over the slots of every code's class
 * (search), or the rows of every class (count) */
static int index_bound(const invact_table *t) {
    int most = 0;
    for (int c = 0; c < (t->search_levels ? BY_CODE : t->n_classes); c++) {
        int end = t->search_levels ? t->slot_of_code[c] + (1 << t->search_levels) : t->class_first[c] + t->class_count[c];
        most = end > most ? end : most;
    }
    return most;
}

/* whether invact_poly_grad takes the table: its counts within the table's bounds */
static int poly_table_taken(const invact_table *t) {
    return t->n_classes >= 1 && t->n_classes <= MAX_CLASSES && t->degree >= 1 && t->degree + COL_C0_LO < MAX_COLUMNS &&
           t->n_transforms >= 1 && t->n_transforms <= MAX_TRANSFORMS && t->search_levels >= 0 &&
           t->search_levels <= MAX_LEVELS;
}

#endif
