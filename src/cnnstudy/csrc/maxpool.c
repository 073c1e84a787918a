/* Max pooling of float32 feature maps stored channels-innermost (torch's channels_last),
 * vectorized across channels with AVX-512 masked loads, so that a layer with fewer
 * channels than vector lanes (the seed network's 10) runs vectorized as well; torch's own
 * channels_last kernel runs such layers one channel at a time.
 *
 * Same results as torch's max_pool2d, forward and backward, bit for bit: the maximum of
 * each k x k window, the first one in row-major window order on ties, a NaN wins (the last
 * NaN, as in torch). Parallel over images (and output rows) with OpenMP: built against the
 * libgomp torch has loaded, it shares torch's threads and torch.set_num_threads.
 *
 * cnnstudy compiles this file on first use (cnnstudy/kernels.py) with -march=native.
 */
#if !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__))
#error "cnnstudy's max-pool kernel needs AVX-512 (F, BW, VL); torch's own kernel is used instead"
#endif
#include <immintrin.h>
#include <stdint.h>
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
