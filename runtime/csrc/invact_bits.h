/* A float's bits and back (memcpy: defined behaviour, one register move once compiled). */
#ifndef INVACT_BITS_H
#define INVACT_BITS_H

#include <stdint.h>
#include <string.h>

static inline uint32_t invact_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float invact_float(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#endif
