"""A straightforward reference of the Attention Regulation step (shared/design/attention-regulation.md), written
line by line from the spec with nothing clever: full (N, h, w, L) logits, the Gaussians built centre by centre,
autograd through the full softmax and torch.quantile. regulation/attention_regulation.py must agree with it.
Only the paper's default numbers; `sigma_rule` as in RegulationConfig."""
import torch


def reference_gaussians(h, w, sigma, dtype=torch.float32):
    ys, xs = torch.meshgrid(torch.arange(h, dtype=dtype), torch.arange(w, dtype=dtype), indexing="ij")
    maps = []
    for i in range(2 * sigma, w, 2 * sigma):        # centre column: outer loop
        for j in range(2 * sigma, h, 2 * sigma):    # centre row: inner loop
            maps.append(torch.exp(-((xs - i) ** 2 + (ys - j) ** 2) / (2 * sigma ** 2)))
    return torch.stack(maps)  # (C, h, w)


def reference_weights(generator, n, c, k):
    if isinstance(generator, (list, tuple)):
        per_image = n // len(generator)
        return torch.cat([torch.rand((per_image, c, k), generator=g) for g in generator])
    return torch.rand((n, c, k), generator=generator)


def reference_regulate(logits, hw, targets, step, prev, generator, sigma_rule="max1", dtype=torch.float32):
    """logits (N, h*w, L) -> (edited logits (N, h*w, L), best Delta (N, h, w, L) to pass as next prev).
    The spec computes in float32; dtype=torch.float64 gives the same algorithm without float32's rounding."""
    n, _, num_tokens = logits.shape
    h, w = hw
    sigma = min(h, w) // 16
    if sigma_rule == "max1":
        sigma = max(1, sigma)
    gauss = reference_gaussians(h, w, sigma, dtype)
    k = len(targets)
    s = logits.reshape(n, h, w, num_tokens).to(dtype)
    weights = reference_weights(generator, n, len(gauss), k).to(dtype)

    def delta_of(wts):
        d = torch.zeros(n, h, w, num_tokens, dtype=dtype)
        for ti, t in enumerate(targets):
            d[..., t] = torch.einsum("nc,cyx->nyx", wts[:, :, ti], gauss)
        return d

    tau = min(1.0, 0.2 * k)

    def loss_of(a, wts):
        q = torch.quantile(a, 0.9, dim=1)
        m = a.mean(dim=1)
        return 1 * ((q - 0.9) ** 2).mean() + 80 * ((m - tau / k) ** 2).mean() + 0.09 * (wts ** 2).mean()

    # One generator: the batch is one problem. A list (one per image): each image keeps its own best iteration,
    # judged by the loss over its own rows (regulation/attention_regulation.py documents this extension).
    images = len(generator) if isinstance(generator, (list, tuple)) else 1
    rows = n // images
    first_delta = delta_of(weights)
    best_loss, best_delta = [float("inf")] * images, torch.zeros(n, h, w, num_tokens, dtype=dtype)
    with torch.enable_grad():
        weights = weights.clone().requires_grad_(True)
        for _ in range(20):
            delta = delta_of(weights)
            a = torch.softmax(s + delta, dim=-1)[..., targets].reshape(n, h * w, k)
            loss = loss_of(a, weights)
            for i in range(images):
                part = slice(i * rows, (i + 1) * rows)
                image_loss = loss_of(a[part], weights[part]).item() if images > 1 else loss.item()
                if image_loss < best_loss[i]:
                    best_loss[i] = image_loss
                    best_delta[part] = delta[part].detach()
            (grad,) = torch.autograd.grad(loss, weights)
            with torch.no_grad():
                weights -= n * 100 * grad
    if prev is None:
        prev = first_delta
    applied = 0.25 * prev + 0.75 * best_delta
    out = s + 0.99 ** step * applied
    return out.reshape(n, h * w, num_tokens), best_delta


def reference_restore_special(probs, logits, eot):
    original = torch.softmax(logits.float(), dim=-1)
    out = probs.clone()
    out[..., 0] = original[..., 0]
    out[..., eot] = original[..., eot]
    return out
