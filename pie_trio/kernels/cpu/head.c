/* The exact stage of a two-stage LM head (torch_ops.ShortlistHead) for fp32 rows.
 *
 * Given approximate logits of the whole vocabulary (the head's int4 copy), each row keeps its
 * `candidates` best, replaces their logits with exact fp32 dot products against the head's
 * own rows, and reports whether the best exact logit clears every logit left out by `margin`
 * (else the caller recomputes the row in full). A selection and a few dozen dot products: in
 * torch the same stage was a dozen ops and a oneDNN weight reorder, ~1.5 ms a step.
 */
#include <stdint.h>

#include "simd.h"

/* The indices of the `keep` largest of `values`, largest first (ties: the lower index). */
static void select_best(const float *values, int64_t count, int64_t keep, int64_t *best) {
    int64_t held = 0;
    for (int64_t i = 0; i < count; i++) {
        if (held == keep && values[i] <= values[best[keep - 1]]) continue;
        int64_t at = held < keep ? held++ : keep - 1; /* drop the smallest when full */
        for (; at > 0 && values[best[at - 1]] < values[i]; at--) best[at] = best[at - 1];
        best[at] = i;
    }
}

/* logits `[rows, vocab]`: the approximate logits, updated in place; `best` scratch of
 * `candidates + 1` per row. unsure[r] = 1 where row r's top is too flat to trust. */
void shortlist_head(const float *x, int64_t rows, int64_t hidden, const float *weight,
                    int64_t vocab, int64_t candidates, float margin, float *logits,
                    int64_t *best, uint8_t *unsure) {
    for (int64_t r = 0; r < rows; r++) {
        float *row = logits + r * vocab;
        int64_t *chosen = best + r * (candidates + 1);
        select_best(row, vocab, candidates + 1, chosen);
        const float left_out = row[chosen[candidates]];
        float top = -__builtin_inff();
        for (int64_t i = 0; i < candidates; i++) {
            const float exact = dot(x + r * hidden, weight + chosen[i] * hidden, hidden);
            row[chosen[i]] = exact;
            top = exact > top ? exact : top;
        }
        unsure[r] = !(top - left_out >= margin);
    }
}
