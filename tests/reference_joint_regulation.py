"""A straightforward reference of Attention Regulation on joint attention (regulation/joint_regulation.py states
it), written line by line with nothing clever: the full joint logits (N, Q, K), Delta built as a full tensor that is
zero outside the image-query rows x target text columns, autograd through the softmax over the text keys and
torch.quantile, the softmax over all keys after the edit, the special columns restored from the unedited softmax."""
import torch

from tools.bench.reference_regulation import reference_gaussians, reference_weights


def reference_joint_regulate(logits, n_text, hw, targets, specials, step, prev, generator, dtype=torch.float64,
                             words=None):
    """logits: the conditional rows' joint logits (N, Q, K), text first. Returns (probabilities (N, Q, K) after
    the edit, the best Delta (N, Q, K) to pass as the next step's prev).

    words (RegulationConfig.per_word): each target's word 0..k-1. Then W has one column per word, each of a
    word's targets takes its word's Delta, the loss reads each word's map (its targets' renormalised probabilities
    summed) and tau counts words."""
    n, q, kk = logits.shape
    h, w = hw
    assert q == kk == n_text + h * w
    sigma = max(1, min(h, w) // 16)
    gauss = reference_gaussians(h, w, sigma, dtype).reshape(-1, h * w)   # (C, h*w), image tokens row-major
    words = list(range(len(targets))) if words is None else list(words)
    k = max(words) + 1
    s = logits.to(dtype)
    weights = reference_weights(generator, n, len(gauss), k).to(dtype)

    def delta_of(wts):
        d = torch.zeros(n, q, kk, dtype=dtype)
        for ti, t in enumerate(targets):
            d[:, n_text:, t] = wts[:, :, words[ti]] @ gauss      # image-query rows, target text column
        return d

    tau = min(1.0, 0.2 * k)

    def loss_of(a, wts):
        qs = torch.quantile(a, 0.9, dim=1)
        m = a.mean(dim=1)
        return ((qs - 0.9) ** 2).mean() + 80 * ((m - tau / k) ** 2).mean() + 0.09 * (wts ** 2).mean()

    images = len(generator) if isinstance(generator, (list, tuple)) else 1
    rows = n // images
    first = delta_of(weights)
    best_loss, best = [float("inf")] * images, torch.zeros(n, q, kk, dtype=dtype)
    with torch.enable_grad():
        weights = weights.clone().requires_grad_(True)
        for _ in range(20):
            delta = delta_of(weights)
            edited = s + delta
            # the maps the loss reads: image queries' attention renormalised over the text keys
            columns = torch.softmax(edited[:, n_text:, :n_text], dim=-1)[..., targets]   # (N, h*w, targets)
            a = torch.stack([sum(columns[..., i] for i in range(len(targets)) if words[i] == word)
                             for word in range(k)], -1)                                   # (N, h*w, k)
            loss = loss_of(a, weights)
            for i in range(images):
                part = slice(i * rows, (i + 1) * rows)
                li = loss_of(a[part], weights[part]).item() if images > 1 else loss.item()
                if li < best_loss[i]:
                    best_loss[i], best[part] = li, delta[part].detach()
            (grad,) = torch.autograd.grad(loss, weights)
            with torch.no_grad():
                weights -= n * 100 * grad
    prev = first if prev is None else prev
    out = s + 0.99 ** step * (0.25 * prev + 0.75 * best)
    probs = torch.softmax(out, dim=-1)                      # over every key, text and image
    original = torch.softmax(s, dim=-1)
    for c in specials:
        probs[:, n_text:, c] = original[:, n_text:, c]
    return probs, best
