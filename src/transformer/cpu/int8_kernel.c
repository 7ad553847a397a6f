/* The int8 product of decoding on AVX-512 CPUs: y = relu?(x W^T + bias) + residual, W in int8.

   Decoding multiplies a few rows (one per sentence or beam) by every weight at every step. In int8 the weights
   are a quarter of fp32's bytes. Each row of x is quantised on the fly, symmetrically with its own scale, and
   shifted by +128 into the unsigned bytes the int8 instructions take; comp[n] = -128 * sum_k W[n, k] subtracts
   the shift again. The products sum into int32 without saturation, so the integer result is exact; only the
   rounding of x and W to 8 bits differs from fp32.

   Two ways to multiply, with the same packed weight and the same result:
   - AVX-512 VNNI (vpdpbusd: 64 byte pairs per instruction), for every CPU this file is built for;
   - AMX (tdpbusd: a 16 x 64 by 64 x 16 block per instruction), where the CPU has it and Linux grants it
     (int8_init), for 16 rows and more: there the products cost little and reading the weights is what remains.

   Loaded by int8.py (ctypes), which packs W, checks the CPU and runs a self-test before choosing it. */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define NV 4     /* 16-column vectors per tile: a tile is 64 output columns, spread over the threads */
#define CHUNK 64 /* inputs per block of the packed weight (one AMX tile's depth) */

/* A packed weight, as int8.py lays it out: N padded to Np (a multiple of 64) and K to Kp (a multiple of 64)
   with zeros, as [Np/64 tiles][Kp/64 chunks][NV vectors][16 groups of 4 inputs][16 columns][4 inputs]: each
   (tile, chunk, vector) is one contiguous 1 KB block, an AMX tile of B. */
typedef struct {
    const int8_t *w;
    const int32_t *comp; /* (Np,) -128 * each row's sum */
    const float *scale;  /* (Np,) each row's scale */
    const float *bias;   /* (Np,) or NULL */
    int64_t K, Kp, N, Np;
} int8_weight;

static int amx_on = 0;

/* Asks Linux for the AMX tile state (granted once per process); returns whether AMX will be used: 1, or 0 when
   not wanted, -1 when Linux refused, -2 when this build has no AMX (a compiler without it: -DINT8_NO_AMX). */
int int8_init(int want_amx) {
    amx_on = 0;
    if (!want_amx) return 0;
#ifdef INT8_NO_AMX
    return -2;
#else
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) != 0) return -1;
    amx_on = 1;
    return 1;
#endif
}

/* Quantise each row of x (M x K floats, row stride ldx) to u8 = round(x * 127 / absmax) + 128, K padded to Kp
   with 128; sx[m] = absmax / 127. */
static void quantize_rows(const float *x, int64_t ldx, int64_t M, int64_t K, int64_t Kp, uint8_t *xq, float *sx,
                          int threads) {
    /* a step's few rows are not worth waking threads for */
    #pragma omp parallel for if (M * K >= 65536) num_threads(threads) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * ldx;
        __m512 amax = _mm512_setzero_ps();
        __mmask16 nan = 0;  /* max drops NaNs: they are tracked apart, and a row with one gives NaNs, as fp32 would */
        int64_t k = 0;
        for (; k + 16 <= K; k += 16) {
            __m512 v = _mm512_loadu_ps(row + k);
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
        }
        if (k < K) {
            __mmask16 tail = (__mmask16)((1u << (K - k)) - 1);
            __m512 v = _mm512_maskz_loadu_ps(tail, row + k);
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
        }
        float a = nan ? __builtin_nanf("") : _mm512_reduce_max_ps(amax);
        float inv = a > 0.f ? 127.f / a : 0.f;  /* 0 for a row of zeros, and for NaN or inf: the scale carries them */
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

/* 16 outputs of one row from their int32 sums (the shift not yet undone): scale, bias, ReLU, residual. */
static inline __attribute__((always_inline)) void store_vec(
        __m512i acc, const int32_t *comp, float sxr, const float *sw, const float *bias, float *y,
        const float *res, int64_t left, int relu) {
    if (left <= 0) return;
    __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
    acc = _mm512_add_epi32(acc, _mm512_loadu_si512(comp));
    __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_mul_ps(_mm512_set1_ps(sxr), _mm512_loadu_ps(sw)));
    if (bias) f = _mm512_add_ps(f, _mm512_loadu_ps(bias));
    if (relu) f = _mm512_max_ps(f, _mm512_setzero_ps());
    if (res) f = _mm512_add_ps(f, _mm512_maskz_loadu_ps(mask, res));
    _mm512_mask_storeu_ps(y, mask, f);
}

/* The arguments every block of one product shares. */
typedef struct {
    const int8_weight *w;
    const uint8_t *xq;
    const float *sx;
    float *y;
    const float *res;
    int64_t M, ldy, ldr;
    int relu;
} job;

/* VNNI: rows [m, m + MR) (padded to whole blocks; those below M stored) against tile t. Written out register
   by register: gcc spills an array of accumulators. */
#define MR 4
#define ACC(r) __m512i a##r##0 = z, a##r##1 = z, a##r##2 = z, a##r##3 = z;
#define DOT(r) { int32_t x4; memcpy(&x4, xq + (r) * Kp + 4 * k4, 4); __m512i xb = _mm512_set1_epi32(x4); \
    a##r##0 = _mm512_dpbusd_epi32(a##r##0, xb, w0); a##r##1 = _mm512_dpbusd_epi32(a##r##1, xb, w1); \
    a##r##2 = _mm512_dpbusd_epi32(a##r##2, xb, w2); a##r##3 = _mm512_dpbusd_epi32(a##r##3, xb, w3); }
#define OUT(r) if (m + (r) < j->M) { \
    const __m512i acc[NV] = {a##r##0, a##r##1, a##r##2, a##r##3}; \
    for (int v = 0; v < NV; v++) \
        store_vec(acc[v], w->comp + n0 + 16 * v, j->sx[m + (r)], w->scale + n0 + 16 * v, \
                  w->bias ? w->bias + n0 + 16 * v : 0, j->y + (m + (r)) * j->ldy + n0 + 16 * v, \
                  j->res ? j->res + (m + (r)) * j->ldr + n0 + 16 * v : 0, w->N - n0 - 16 * v, j->relu); }

static void vnni_block(const job *j, int64_t t, int64_t m, const int8_t *prefetch, int pf_first, int pf_step) {
    const int8_weight *w = j->w;
    int64_t Kp = w->Kp, n0 = 64 * t;
    const int8_t *wt = w->w + t * 64 * Kp;
    const uint8_t *xq = j->xq + m * Kp;
    __m512i z = _mm512_setzero_si512();
    ACC(0) ACC(1) ACC(2) ACC(3)
    for (int64_t k4 = 0; k4 < Kp / 4; k4++) {
        const int8_t *b = wt + (k4 / 16) * (NV * 1024) + (k4 % 16) * 64;  /* vector v: + 1024 v */
        __m512i w0 = _mm512_loadu_si512(b), w1 = _mm512_loadu_si512(b + 1024);
        __m512i w2 = _mm512_loadu_si512(b + 2048), w3 = _mm512_loadu_si512(b + 3072);
        DOT(0) DOT(1) DOT(2) DOT(3)
        if (prefetch)
            for (int l = pf_first; l < NV; l += pf_step)
                _mm_prefetch((const char *)(prefetch + k4 * 256 + 64 * l), _MM_HINT_T1);
    }
    OUT(0) OUT(1) OUT(2) OUT(3)
}

/* VNNI over tile t: only the first register block reads the tile from memory, the others find it in cache.
   While they compute, they fetch the next tile into L2 (each a share of every 256 bytes), so that memory keeps
   streaming: the hardware prefetcher alone left it idle during those blocks. A lone block fetches all of it. */
static void vnni_tile(const job *j, int64_t t, int64_t tiles) {
    const int8_t *next = t + 1 < tiles ? j->w->w + (t + 1) * 64 * j->w->Kp : 0;
    int64_t blocks = (j->M + MR - 1) / MR;
    for (int64_t i = 0; i < blocks; i++) {
        int first = blocks == 1 ? 0 : (int)(i - 1), step = blocks == 1 ? 1 : (int)(blocks - 1);
        vnni_block(j, t, i * MR, next && first >= 0 && first < NV ? next : 0, first, step);
    }
}

#ifndef INT8_NO_AMX
/* AMX over tile t, rows in pairs of 16-row blocks (the input padded to whole pairs): tiles 0-3 sum
   (rows block a, b) x (vectors v, v + 1), 4-5 hold the rows, 6-7 the weights. */
__attribute__((target("amx-tile,amx-int8")))
static void amx_tile(const job *j, int64_t t, int64_t tiles, int32_t *out /* 4 x 16 x 16 */) {
    const int8_weight *w = j->w;
    int64_t Kp = w->Kp, n0 = 64 * t;
    const int8_t *wt = w->w + t * 64 * Kp;
    /* the next tile's same bytes are fetched into L2 as this one's are read: the tile loads wait on memory */
    const int8_t *next = t + 1 < tiles ? wt + 64 * Kp : 0;
    for (int64_t m = 0; m < j->M; m += 32) {
        for (int v = 0; v < NV; v += 2) {
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
            for (int64_t c = 0; c < Kp / CHUNK; c++) {
                const int8_t *b = wt + c * (NV * 1024) + v * 1024;
                _tile_loadd(4, j->xq + m * Kp + c * CHUNK, Kp);
                _tile_loadd(5, j->xq + (m + 16) * Kp + c * CHUNK, Kp);
                _tile_loadd(6, b, 64);
                _tile_loadd(7, b + 1024, 64);
                _tile_dpbusd(0, 4, 6); _tile_dpbusd(1, 4, 7); _tile_dpbusd(2, 5, 6); _tile_dpbusd(3, 5, 7);
                if (next && m == 0)
                    for (int l = 0; l < 2048; l += 64) _mm_prefetch((const char *)(b - wt + next + l), _MM_HINT_T1);
            }
            _tile_stored(0, out, 64); _tile_stored(1, out + 256, 64);
            _tile_stored(2, out + 512, 64); _tile_stored(3, out + 768, 64);
            for (int r = 0; r < 32 && m + r < j->M; r++)
                for (int h = 0; h < 2; h++) {
                    int64_t col = n0 + 16 * (v + h), row = m + r;
                    __m512i acc = _mm512_loadu_si512(out + 256 * (2 * (r / 16) + h) + 16 * (r % 16));
                    store_vec(acc, w->comp + col, j->sx[row], w->scale + col, w->bias ? w->bias + col : 0,
                              j->y + row * j->ldy + col, j->res ? j->res + row * j->ldr + col : 0, w->N - col,
                              j->relu);
                }
        }
    }
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

__attribute__((target("amx-tile,amx-int8")))
static void amx_product(const job *j, int64_t tiles, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        tile_config cfg = {0};
        cfg.palette = 1;
        for (int i = 0; i < 8; i++) {
            cfg.rows[i] = 16;
            cfg.colsb[i] = 64;
        }
        _tile_loadconfig(&cfg);
        int32_t out[4 * 256];
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; t++) amx_tile(j, t, tiles, out);
        _tile_release();
    }
}

#endif

/* y (M x N, row stride ldy) = relu?(x W^T + bias) + res (x: M x K, row stride ldx; res: row stride ldr, or
   NULL), on `threads` threads (PyTorch's count: a thread of the caller's own would otherwise take OpenMP's
   default). Returns 0, or -1 when out of memory. */
int int8_linear(const int8_weight *w, const float *x, int64_t ldx, int64_t M, float *y, int64_t ldy,
                const float *res, int64_t ldr, _Bool relu, int threads) {
    int amx = amx_on && M >= 16;
    int64_t Mp = amx ? (M + 31) / 32 * 32 : (M + MR - 1) / MR * MR;  /* whole blocks; padding rows not stored */
    uint8_t *xq = (uint8_t *)malloc((size_t)(Mp * w->Kp));
    float *sx = (float *)malloc((size_t)Mp * sizeof(float));
    if (!xq || !sx) { free(xq); free(sx); return -1; }
    quantize_rows(x, ldx, M, w->K, w->Kp, xq, sx, threads);
    memset(xq + M * w->Kp, 128, (size_t)((Mp - M) * w->Kp));  /* padding rows: zeros once shifted */
    for (int64_t m = M; m < Mp; m++) sx[m] = 0.f;
    job j = {w, xq, sx, y, res, M, ldy, ldr, relu};
    int64_t tiles = w->Np / 64;
#ifndef INT8_NO_AMX
    if (amx) {
        amx_product(&j, tiles, threads);
    } else
#endif
    {
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t t = 0; t < tiles; t++) vnni_tile(&j, t, tiles);
    }
    free(xq);
    free(sx);
    return 0;
}
