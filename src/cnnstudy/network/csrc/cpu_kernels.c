/* cnnstudy's CPU kernels, for float32 maps stored channels-innermost (torch's channels_last),
 * vectorized across channels with AVX-512 masked loads, so that layers with fewer channels
 * than vector lanes (the seed network's 10) run vectorized as well:
 *
 * 1. Max pooling, k x k windows, stride s. Same results as torch's max_pool2d, forward and
 *    backward, bit for bit: the first maximum in row-major window order on ties, a NaN wins
 *    (the last NaN, as in torch). torch's channels_last kernel runs a layer with fewer
 *    channels than lanes one channel at a time.
 * 2. A first conv layer (stride 1, no padding, input that needs no gradient) fused with the
 *    2x2/2 max pool after it: the conv outputs of each window are summed in registers and
 *    only their maximum is stored, so the conv's full-size output (4 MB a batch of 128 in the
 *    seed network) is never written, read or zero-filled; the weight gradient sums each
 *    pooled gradient times the input under its argmax. Same function as conv2d + max_pool2d;
 *    sums are taken in another order than oneDNN's, so results differ in float rounding.
 *
 * Parallel with OpenMP: built against the libgomp torch has loaded, the kernels share
 * torch's threads and torch.set_num_threads. Deterministic for a given thread count.
 * cnnstudy compiles this file on first use (cnnstudy/network/cpu_kernels.py) with -march=native.
 */
#if !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__))
#error "cnnstudy's CPU kernels need AVX-512 (F, BW, VL); torch's own kernels are used instead"
#endif
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline __mmask16 lanes(long left)
{
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
}

/* x: (n, h, w, c); out, idx: (n, ho, wo, c) with ho = (h - k) / s + 1 (likewise wo).
 * idx holds the argmax's place in its window, ky * k + kx (k <= 16). */
void cnnstudy_maxpool_forward(const float *restrict x, float *restrict out,
                              uint8_t *restrict idx, long n, long h, long w, long c, long k,
                              long s)
{
    const long ho = (h - k) / s + 1, wo = (w - k) / s + 1;
#pragma omp parallel for schedule(static)
    for (long row = 0; row < n * ho; row++) {
        const long b = row / ho, oh = row % ho;
        const float *top = x + (b * h + oh * s) * w * c;
        float *o = out + row * wo * c;
        uint8_t *at = idx + row * wo * c;
        for (long ow = 0; ow < wo; ow++) {
            for (long ch = 0; ch < c; ch += 16) {
                const __mmask16 m = lanes(c - ch);
                const float *p = top + ow * s * c + ch;
                __m512 best = _mm512_maskz_loadu_ps(m, p);
                __m128i where = _mm_setzero_si128();
                for (long ky = 0; ky < k; ky++) {
                    for (long kx = ky == 0 ? 1 : 0; kx < k; kx++) {
                        const __m512 v = _mm512_maskz_loadu_ps(m, p + (ky * w + kx) * c);
                        const __mmask16 up = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ) |
                                             _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
                        best = _mm512_mask_mov_ps(best, up, v);
                        where = _mm_mask_mov_epi8(where, up, _mm_set1_epi8((char)(ky * k + kx)));
                    }
                }
                _mm512_mask_storeu_ps(o + ow * c + ch, m, best);
                _mm_mask_storeu_epi8(at + ow * c + ch, m, where);
            }
        }
    }
}

/* g, idx: (n, ho, wo, c); gx: (n, h, w, c), written whole. */
void cnnstudy_maxpool_backward(const float *restrict g, const uint8_t *restrict idx,
                               float *restrict gx, long n, long h, long w, long c, long k,
                               long s)
{
    const long ho = (h - k) / s + 1, wo = (w - k) / s + 1;
    if (k != s) {
        /* Windows overlap (s < k) or leave gaps (s > k): zero each image, then add each
         * gradient at its argmax. Images are independent, so each thread owns its own. */
#pragma omp parallel for schedule(static)
        for (long b = 0; b < n; b++) {
            float *image = gx + b * h * w * c;
            memset(image, 0, (size_t)(h * w * c) * sizeof(float));
            for (long oh = 0; oh < ho; oh++) {
                for (long ow = 0; ow < wo; ow++) {
                    const long j = ((b * ho + oh) * wo + ow) * c;
                    for (long ch = 0; ch < c; ch++) {
                        const long ky = idx[j + ch] / k, kx = idx[j + ch] % k;
                        image[((oh * s + ky) * w + ow * s + kx) * c + ch] += g[j + ch];
                    }
                }
            }
        }
        return;
    }
    /* Windows tile the map: write each window whole (the gradient at its argmax, zeros
     * elsewhere), and zeros where no window reaches (the right and bottom remainders). */
    const long used_w = wo * k, rowlen = w * c;
#pragma omp parallel for schedule(static)
    for (long row = 0; row < n * ho; row++) {
        const long b = row / ho, oh = row % ho;
        float *top = gx + (b * h + oh * k) * rowlen;
        const float *gg = g + row * wo * c;
        const uint8_t *at = idx + row * wo * c;
        for (long ow = 0; ow < wo; ow++) {
            for (long ch = 0; ch < c; ch += 16) {
                const __mmask16 m = lanes(c - ch);
                const __m512 v = _mm512_maskz_loadu_ps(m, gg + ow * c + ch);
                const __m128i where = _mm_maskz_loadu_epi8(m, at + ow * c + ch);
                float *p = top + ow * k * c + ch;
                for (long ky = 0; ky < k; ky++) {
                    for (long kx = 0; kx < k; kx++) {
                        const __mmask16 hit =
                            _mm_cmpeq_epi8_mask(where, _mm_set1_epi8((char)(ky * k + kx)));
                        _mm512_mask_storeu_ps(p + (ky * w + kx) * c, m,
                                              _mm512_maskz_mov_ps(hit, v));
                    }
                }
            }
        }
        if (used_w < w) {
            for (long ky = 0; ky < k; ky++)
                memset(top + ky * rowlen + used_w * c, 0, (size_t)((w - used_w) * c) * sizeof(float));
        }
        if (oh == ho - 1 && ho * k < h)
            memset(top + k * rowlen, 0, (size_t)((h - ho * k) * rowlen) * sizeof(float));
    }
}

/* ------------------------------------------------ conv (stride 1, no padding) + 2x2/2 max pool */

/* The maximum of a window's four conv outputs, first wins, a NaN wins: as max_pool2d; with
 * relu, then max(0, .) as torch.relu (NaN stays NaN), its place set to 4 (no gradient)
 * wherever the result is not positive, as relu's backward passes none there. */
static inline void pick(__m512 a0, __m512 a1, __m512 a2, __m512 a3, float *o, uint8_t *at,
                        __mmask16 m, long relu)
{
    __m512 best = a0; __m128i where = _mm_setzero_si128(); __mmask16 up;
    up = _mm512_cmp_ps_mask(a1, best, _CMP_GT_OQ) | _mm512_cmp_ps_mask(a1, a1, _CMP_UNORD_Q);
    best = _mm512_mask_mov_ps(best, up, a1); where = _mm_mask_mov_epi8(where, up, _mm_set1_epi8(1));
    up = _mm512_cmp_ps_mask(a2, best, _CMP_GT_OQ) | _mm512_cmp_ps_mask(a2, a2, _CMP_UNORD_Q);
    best = _mm512_mask_mov_ps(best, up, a2); where = _mm_mask_mov_epi8(where, up, _mm_set1_epi8(2));
    up = _mm512_cmp_ps_mask(a3, best, _CMP_GT_OQ) | _mm512_cmp_ps_mask(a3, a3, _CMP_UNORD_Q);
    best = _mm512_mask_mov_ps(best, up, a3); where = _mm_mask_mov_epi8(where, up, _mm_set1_epi8(3));
    if (relu) {
        const __mmask16 dead = ~_mm512_cmp_ps_mask(best, _mm512_setzero_ps(), _CMP_GT_OQ);
        best = _mm512_max_ps(_mm512_setzero_ps(), best); /* the second operand on NaN */
        where = _mm_mask_mov_epi8(where, dead, _mm_set1_epi8(4));
    }
    _mm512_mask_storeu_ps(o, m, best);
    _mm_mask_storeu_epi8(at, m, where);
}
/* x (n, h, w, cin); wt (f, f, cin, cp) and bias (cp), cout padded with zeros to cp, a
 * multiple of 16; out, idx (n, ho, wo, cout) with ho = (h - f + 1) / 2 (likewise wo), idx
 * the argmax's place in its window (2 * dy + dx), as the max-pool kernel stores it, or 4.
 * relu: a ReLU after the pool, applied here too. */
void cnnstudy_convpool_forward(const float *restrict x, const float *restrict wt,
                               const float *restrict bias, float *restrict out,
                               uint8_t *restrict idx, long n, long h, long w, long cin, long f,
                               long cout, long relu)
{
    const long ho = (h - f + 1) / 2, wo = (w - f + 1) / 2, cp = (cout + 15) / 16 * 16;
    const long span = f * cin, rowlen = w * cin;
#pragma omp parallel for schedule(static)
    for (long row = 0; row < n * ho; row++) {
        const long b = row / ho, oh = row % ho;
        for (long ch = 0; ch < cp; ch += 16) {
            const __mmask16 m = lanes(cout - ch);
            const __m512 bv = _mm512_loadu_ps(bias + ch);
            /* two pooled pixels at a time, eight independent sums; where the row has an odd
             * number, the last pixel's partner is itself again, and is not stored */
            for (long ow = 0; ow < wo; ow += 2) {
                const int pair = ow + 1 < wo;
                const long c2 = pair ? 2 * cin : 0, c3 = c2 + cin;
                const float *p0 = x + ((b * h + 2 * oh) * w + 2 * ow) * cin;
                __m512 a0 = bv, a1 = bv, a2 = bv, a3 = bv, b0 = bv, b1 = bv, b2 = bv, b3 = bv;
                for (long u = 0; u < f; u++) {
                    const float *r0 = p0 + u * rowlen, *r1 = r0 + rowlen;
                    const float *wu = wt + u * span * cp + ch;
                    for (long j = 0; j < span; j++) {
                        const __m512 wv = _mm512_loadu_ps(wu + j * cp);
                        a0 = _mm512_fmadd_ps(_mm512_set1_ps(r0[j]), wv, a0);
                        a1 = _mm512_fmadd_ps(_mm512_set1_ps(r0[j + cin]), wv, a1);
                        b0 = _mm512_fmadd_ps(_mm512_set1_ps(r0[j + c2]), wv, b0);
                        b1 = _mm512_fmadd_ps(_mm512_set1_ps(r0[j + c3]), wv, b1);
                        a2 = _mm512_fmadd_ps(_mm512_set1_ps(r1[j]), wv, a2);
                        a3 = _mm512_fmadd_ps(_mm512_set1_ps(r1[j + cin]), wv, a3);
                        b2 = _mm512_fmadd_ps(_mm512_set1_ps(r1[j + c2]), wv, b2);
                        b3 = _mm512_fmadd_ps(_mm512_set1_ps(r1[j + c3]), wv, b3);
                    }
                }
                const long o = (row * wo + ow) * cout + ch;
                pick(a0, a1, a2, a3, out + o, idx + o, m, relu);
                if (pair)
                    pick(b0, b1, b2, b3, out + o + cout, idx + o + cout, m, relu);
            }
        }
    }
}
/* One pooled gradient vector split by argmax: gp[p] holds it where window place p won
 * (none where the place is 4: a ReLU passed no gradient). */
static inline void phases(const float *g, const uint8_t *idx, __mmask16 m, __m512 *gp, __m512 *gsum)
{
    const __m128i at = _mm_maskz_loadu_epi8(m, idx);
    const __m512 gv = _mm512_maskz_loadu_ps(m & _mm_cmplt_epu8_mask(at, _mm_set1_epi8(4)), g);
    for (int p = 0; p < 4; p++)
        gp[p] = _mm512_maskz_mov_ps(_mm_cmpeq_epi8_mask(at, _mm_set1_epi8((char)p)), gv);
    *gsum = _mm512_add_ps(*gsum, gv);
}
/* Weight and bias gradients: gw (f, f, cin, cp) and gb (cp), written whole. Each thread sums
 * its share of the rows into its own buffer; the buffers of the threads that ran are added
 * in thread order. OpenMP may start fewer threads than omp_get_max_threads() (OMP_DYNAMIC,
 * OMP_THREAD_LIMIT, nesting): only the team's own buffers are summed.
 * Returns 0, or -1 when the buffers cannot be allocated. */
int cnnstudy_convpool_backward(const float *restrict x, const float *restrict g,
                               const uint8_t *restrict idx, float *restrict gw,
                               float *restrict gb, long n, long h, long w, long cin, long f,
                               long cout)
{
    const long ho = (h - f + 1) / 2, wo = (w - f + 1) / 2, cp = (cout + 15) / 16 * 16;
    const long span = f * cin, rowlen = w * cin, taps = f * span, size = (taps + 1) * cp;
    const int threads = omp_get_max_threads();
    int team = 1;
    float *partial = aligned_alloc(64, (size_t)(threads * size) * sizeof(float));
    if (partial == NULL)
        return -1;
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        if (t == 0)
            team = nt;
        float *acc = partial + t * size;
        memset(acc, 0, (size_t)size * sizeof(float));
        const long rows = n * ho, lo = rows * t / nt, hi = rows * (t + 1) / nt;
        for (long ch = 0; ch < cp; ch += 16) {
            const __mmask16 m = lanes(cout - ch);
            __m512 gsum = _mm512_setzero_ps();
            for (long row = lo; row < hi; row++) {
                const long b = row / ho, oh = row % ho;
                /* two pooled pixels at a time, as in the forward pass; an odd last pixel's
                 * partner is itself again, with a zero gradient */
                for (long ow = 0; ow < wo; ow += 2) {
                    const int pair = ow + 1 < wo;
                    const long c2 = pair ? 2 * cin : 0, c3 = c2 + cin;
                    const float *p0 = x + ((b * h + 2 * oh) * w + 2 * ow) * cin;
                    const long o = (row * wo + ow) * cout + ch;
                    __m512 ga[4], gb2[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(),
                                            _mm512_setzero_ps(), _mm512_setzero_ps()};
                    phases(g + o, idx + o, m, ga, &gsum);
                    if (pair)
                        phases(g + o + cout, idx + o + cout, m, gb2, &gsum);
                    for (long u = 0; u < f; u++) {
                        const float *r0 = p0 + u * rowlen, *r1 = r0 + rowlen;
                        float *au = acc + u * span * cp + ch;
                        for (long j = 0; j < span; j++) {
                            __m512 s0 = _mm512_load_ps(au + j * cp);
                            __m512 s1 = _mm512_mul_ps(_mm512_set1_ps(r0[j + c2]), gb2[0]);
                            s0 = _mm512_fmadd_ps(_mm512_set1_ps(r0[j]), ga[0], s0);
                            s1 = _mm512_fmadd_ps(_mm512_set1_ps(r0[j + c3]), gb2[1], s1);
                            s0 = _mm512_fmadd_ps(_mm512_set1_ps(r0[j + cin]), ga[1], s0);
                            s1 = _mm512_fmadd_ps(_mm512_set1_ps(r1[j + c2]), gb2[2], s1);
                            s0 = _mm512_fmadd_ps(_mm512_set1_ps(r1[j]), ga[2], s0);
                            s1 = _mm512_fmadd_ps(_mm512_set1_ps(r1[j + c3]), gb2[3], s1);
                            s0 = _mm512_fmadd_ps(_mm512_set1_ps(r1[j + cin]), ga[3], s0);
                            _mm512_store_ps(au + j * cp, _mm512_add_ps(s0, s1));
                        }
                    }
                }
            }
            _mm512_store_ps(acc + taps * cp + ch, gsum);
        }
    }
    for (long i = 0; i < size; i++) {
        float s = 0.0f;
        for (int t = 0; t < team; t++) s += partial[t * size + i];
        if (i < taps * cp) gw[i] = s; else gb[i - taps * cp] = s;
    }
    free(partial);
    return 0;
}
