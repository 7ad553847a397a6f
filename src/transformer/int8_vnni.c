/* The int8 product of decoding, with AVX-512 VNNI: y = relu?(x W^T + bias) + residual, W in int8.

   Decoding multiplies a few rows (one per sentence or beam) by every weight at every step. In int8 the weights
   are a quarter of fp32's bytes, and VNNI's vpdpbusd multiplies 64 byte pairs per instruction. Each row of x is
   quantised on the fly, symmetrically with its own scale, and shifted by +128 into the unsigned bytes vpdpbusd
   takes; comp[n] = -128 * sum_k W[n, k] subtracts the shift again. vpdpbusd sums into int32 without saturation,
   so the integer result is exact; only the rounding of x and W to 8 bits differs from fp32.

   Loaded by int8.py (ctypes), which packs W, checks the CPU and runs a self-test before choosing it. */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define NV 4  /* 16-column vectors per tile: a tile is 64 output columns, spread over the threads */

/* Quantise each row of x (M x K floats, row stride ldx) to u8 = round(x * 127 / absmax) + 128, K padded to Kp
   with 128; sx[m] = absmax / 127. */
static void quantize_rows(const float *x, int64_t ldx, int64_t M, int64_t K, int64_t Kp, uint8_t *xq, float *sx) {
    #pragma omp parallel for if (M * K >= 65536) schedule(static)  /* a step's few rows: not worth waking threads */
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * ldx;
        __m512 amax = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 16 <= K; k += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(row + k)));
        if (k < K) {
            __mmask16 tail = (__mmask16)((1u << (K - k)) - 1);
            amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_maskz_loadu_ps(tail, row + k)));
        }
        float a = _mm512_reduce_max_ps(amax);
        float inv = a > 0.f ? 127.f / a : 0.f;
        sx[m] = a / 127.f;
        __m512 vinv = _mm512_set1_ps(inv);
        __m512i shift = _mm512_set1_epi32(128);
        uint8_t *q = xq + m * Kp;
        for (k = 0; k + 16 <= K; k += 16) {
            __m512i v = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(row + k), vinv)), shift);
            _mm_storeu_si128((__m128i *)(q + k), _mm512_cvtepi32_epi8(v));
        }
        if (k < K) {
            __mmask16 tail = (__mmask16)((1u << (K - k)) - 1);
            __m512i v = _mm512_add_epi32(
                _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(tail, row + k), vinv)), shift);
            _mm512_mask_cvtepi32_storeu_epi8(q + k, tail, v);
        }
        for (k = K; k < Kp; k++) q[k] = 128;
    }
}

/* One register block: rows [0, MR) of xq (padded to whole blocks) against one 64-column tile of the packed
   weight; rows [0, mr) are stored. Written out register by register: gcc spills an array of accumulators. */
#define MR 4
#define ACC(r) __m512i a##r##0 = c0, a##r##1 = c1, a##r##2 = c2, a##r##3 = c3;
#define DOT(r) { __m512i xb = _mm512_set1_epi32(*(const int32_t *)(xq + (r) * Kp + 4 * k4)); \
    a##r##0 = _mm512_dpbusd_epi32(a##r##0, xb, w0); a##r##1 = _mm512_dpbusd_epi32(a##r##1, xb, w1); \
    a##r##2 = _mm512_dpbusd_epi32(a##r##2, xb, w2); a##r##3 = _mm512_dpbusd_epi32(a##r##3, xb, w3); }
#define OUT(r) if ((r) < mr) { __m512i acc[NV] = {a##r##0, a##r##1, a##r##2, a##r##3}; \
    store_row(acc, sx[r], sw, bias, y + (r) * ldy, res ? res + (r) * ldr : 0, ncols, relu); }

static inline __attribute__((always_inline)) void store_row(
        const __m512i *acc, float sxr, const float *sw, const float *bias, float *y, const float *res,
        int64_t ncols, int relu) {
    __m512 s = _mm512_set1_ps(sxr);
    for (int v = 0; v < NV; v++) {
        int64_t left = ncols - 16 * v;
        if (left <= 0) break;
        __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
        __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[v]), _mm512_mul_ps(s, _mm512_loadu_ps(sw + 16 * v)));
        if (bias) f = _mm512_add_ps(f, _mm512_loadu_ps(bias + 16 * v));
        if (relu) f = _mm512_max_ps(f, _mm512_setzero_ps());
        if (res) f = _mm512_add_ps(f, _mm512_maskz_loadu_ps(mask, res + 16 * v));
        _mm512_mask_storeu_ps(y + 16 * v, mask, f);
    }
}

static void block(int64_t mr, const uint8_t *xq, int64_t Kp, const int8_t *wt, const int32_t *comp,
                  const float *sw, const float *bias, const float *sx, float *y, int64_t ldy, const float *res,
                  int64_t ldr, int64_t ncols, int relu, const int8_t *prefetch, int pf_first, int pf_step) {
    __m512i c0 = _mm512_loadu_si512(comp), c1 = _mm512_loadu_si512(comp + 16);
    __m512i c2 = _mm512_loadu_si512(comp + 32), c3 = _mm512_loadu_si512(comp + 48);
    ACC(0) ACC(1) ACC(2) ACC(3)
    for (int64_t k4 = 0; k4 < Kp / 4; k4++) {
        const int8_t *w = wt + k4 * 64 * NV;
        __m512i w0 = _mm512_loadu_si512(w), w1 = _mm512_loadu_si512(w + 64);
        __m512i w2 = _mm512_loadu_si512(w + 128), w3 = _mm512_loadu_si512(w + 192);
        DOT(0) DOT(1) DOT(2) DOT(3)
        if (prefetch)
            for (int l = pf_first; l < NV; l += pf_step)
                _mm_prefetch((const char *)(prefetch + k4 * 64 * NV + 64 * l), _MM_HINT_T1);
    }
    OUT(0) OUT(1) OUT(2) OUT(3)
}

/* y (M x N, row stride ldy) = relu?(x W^T + bias) + res (x: M x K, row stride ldx). W is packed by the caller: N padded to Np (a multiple of 64)
   and K to Kp (a multiple of 4) with zeros, laid out as [Np/64][Kp/4][NV][16 columns][4 k]; comp[n] =
   -128 * sum_k W[n, k] undoes the +128 of the u8 input; sw[n] is row n's scale; bias, res may be NULL. Returns 0, or -1 when out of memory. */
int int8_linear(const float *x, int64_t ldx, int64_t M, int64_t K, int64_t Kp,
                const int8_t *wp, const int32_t *comp, const float *sw, const float *bias, int64_t N, int64_t Np,
                float *y, int64_t ldy, const float *res, int64_t ldr, int relu) {
    int64_t Mp = (M + MR - 1) / MR * MR;  /* whole register blocks: the padding rows are never stored */
    uint8_t *xq = (uint8_t *)malloc((size_t)(Mp * Kp));
    float *sx = (float *)malloc((size_t)Mp * sizeof(float));
    if (!xq || !sx) { free(xq); free(sx); return -1; }
    quantize_rows(x, ldx, M, K, Kp, xq, sx);
    for (int64_t i = M * Kp; i < Mp * Kp; i++) xq[i] = 128;
    for (int64_t m = M; m < Mp; m++) sx[m] = 0.f;
    int64_t tiles = Np / 64;
    #pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        int64_t n0 = t * 64, ncols = N - n0 < 64 ? N - n0 : 64;
        const int8_t *wt = wp + t * 64 * Kp;
        const float *b = bias ? bias + n0 : 0;
        /* Only the first register block reads the tile from memory; the others find it in cache. While they
           compute, they fetch the next tile into L2 (each a share of every 256-byte step's four lines), so that
           memory keeps streaming: the hardware prefetcher alone left it idle during those blocks. A lone block
           fetches all of the next tile. */
        const int8_t *next = t + 1 < tiles ? wt + 64 * Kp : 0;
        int64_t blocks = Mp / MR;
        for (int64_t i = 0; i < blocks; i++) {
            int64_t m = i * MR;
            int first = blocks == 1 ? 0 : (int)(i - 1), step = blocks == 1 ? 1 : (int)(blocks - 1);
            block(M - m < MR ? M - m : MR, xq + m * Kp, Kp, wt, comp + n0, sw + n0, b, sx + m,
                  y + m * ldy + n0, ldy, res ? res + m * ldr + n0 : 0, ldr, ncols, relu,
                  next && first >= 0 && first < NV ? next : 0, first, step);
        }
    }
    free(xq);
    free(sx);
    return 0;
}
