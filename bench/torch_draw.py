"""DRAW in plain PyTorch eager mode: the peer that npdraw's benchmark races.

This is the model a typical PyTorch user would write from the paper
(Gregor et al. 2015): ``nn.LSTMCell`` for encoder and decoder, ``nn.Linear``
for the other layers, autograd for the gradients, ``torch.optim.Adam`` and
``clip_grad_norm_`` for the update. Nothing is fused or hand-tuned, and
nothing is made slow on purpose.

It computes exactly npdraw's model (see ``npdraw.model``), so that, loaded
with the same parameters (``load_from_npdraw``) and fed the same noise, it
gives the same loss and gradients. The layout differences it bridges:

* npdraw's LSTM weight is one matrix whose rows are the inputs in order
  ``[input..., h_prev]`` and whose column blocks are gates ``[i, f, o, g]``;
  ``nn.LSTMCell`` has ``weight_ih`` (4H, I) and ``weight_hh`` (4H, H) with
  gate blocks ``[i, f, g, o]`` and two biases (``bias_ih`` holds npdraw's
  bias, ``bias_hh`` is zero).
* npdraw's dense weights are (in, out); ``nn.Linear`` stores (out, in).

Legend of dimension letters: B batch, C channels, H height, W width,
D = C*H*W, N attention grid size, Z latent units.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["TorchDraw", "make_optimizer", "train_step", "gate_perm"]


def gate_perm(hidden: int) -> np.ndarray:
    """Column indices taking gate blocks [i, f, o, g] to [i, f, g, o].

    The permutation only swaps the last two blocks, so it is its own inverse.
    """
    blocks = [np.arange(k * hidden, (k + 1) * hidden) for k in range(4)]
    return np.concatenate([blocks[0], blocks[1], blocks[3], blocks[2]])


def _filterbank(p: torch.Tensor, N: int, H: int, W: int):
    """Attention parameters (B, 5) -> (F_X (B,N,W), F_Y (B,N,H), gamma (B,)).

    Columns of p: (g~X, g~Y, log sigma^2, log delta~, log gamma). Pixel
    coordinates are 1-based; each filter row is a normalised Gaussian.
    """
    gx = (W + 1) / 2 * (p[:, 0] + 1)
    gy = (H + 1) / 2 * (p[:, 1] + 1)
    sigma2 = torch.exp(p[:, 2])
    delta = (max(H, W) - 1) / max(N - 1, 1) * torch.exp(p[:, 3])
    gamma = torch.exp(p[:, 4])
    offs = torch.arange(1, N + 1, dtype=p.dtype, device=p.device) - N / 2 - 0.5
    mu_x = gx[:, None] + offs[None, :] * delta[:, None]  # (B, N)
    mu_y = gy[:, None] + offs[None, :] * delta[:, None]
    a = torch.arange(1, W + 1, dtype=p.dtype, device=p.device)
    b = torch.arange(1, H + 1, dtype=p.dtype, device=p.device)
    s2 = 2 * sigma2[:, None, None]
    Fx = torch.softmax(-(a[None, None, :] - mu_x[:, :, None]) ** 2 / s2, dim=-1)
    Fy = torch.softmax(-(b[None, None, :] - mu_y[:, :, None]) ** 2 / s2, dim=-1)
    return Fx, Fy, gamma


class TorchDraw(nn.Module):
    """DRAW with or without attention; ``forward(x, eps)`` returns the batch-mean loss.

    cfg is an ``npdraw.DrawConfig`` (or anything with the same attributes).
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D = cfg.channels * cfg.height * cfg.width
        if cfg.attention:
            read_dim = 2 * cfg.channels * cfg.read_n ** 2
            write_dim = cfg.channels * cfg.write_n ** 2
        else:
            read_dim, write_dim = 2 * D, D
        self.D, self.read_dim, self.write_dim = D, read_dim, write_dim
        self.c0 = nn.Parameter(torch.zeros(D))
        self.h_enc0 = nn.Parameter(torch.zeros(cfg.enc_dim))
        self.h_dec0 = nn.Parameter(torch.zeros(cfg.dec_dim))
        self.encoder = nn.LSTMCell(read_dim + cfg.dec_dim, cfg.enc_dim)
        self.q = nn.Linear(cfg.enc_dim, 2 * cfg.z_dim)
        self.decoder = nn.LSTMCell(cfg.z_dim, cfg.dec_dim)
        self.write_layer = nn.Linear(cfg.dec_dim, write_dim)
        if cfg.attention:
            self.read_att = nn.Linear(cfg.dec_dim, 5)
            self.write_att = nn.Linear(cfg.dec_dim, 5)

    # -- the model -------------------------------------------------------
    def read(self, x, xhat, h_dec):
        if not self.cfg.attention:
            return torch.cat([x, xhat], dim=1)
        cfg = self.cfg
        B, C, H, W, N = x.shape[0], cfg.channels, cfg.height, cfg.width, cfg.read_n
        Fx, Fy, gamma = _filterbank(self.read_att(h_dec), N, H, W)
        imgs = torch.stack([x, xhat], dim=1).view(B, 2 * C, H, W)
        glimpse = Fy[:, None] @ imgs @ Fx.transpose(1, 2)[:, None]  # (B, 2C, N, N)
        return gamma[:, None] * glimpse.reshape(B, -1)

    def write(self, h_dec):
        w = self.write_layer(h_dec)
        if not self.cfg.attention:
            return w
        cfg = self.cfg
        B, C, H, W, N = h_dec.shape[0], cfg.channels, cfg.height, cfg.width, cfg.write_n
        Fx, Fy, gamma = _filterbank(self.write_att(h_dec), N, H, W)
        patch = w.view(B, C, N, N)
        canvas = Fy.transpose(1, 2)[:, None] @ patch @ Fx[:, None]  # (B, C, H, W)
        return canvas.reshape(B, -1) / gamma[:, None]

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x (B, D) in [0, 1]; eps (T, B, Z) standard normal noise -> scalar batch-mean loss."""
        cfg = self.cfg
        B = x.shape[0]
        h_enc = self.h_enc0.expand(B, -1)
        h_dec = self.h_dec0.expand(B, -1)
        c_enc = x.new_zeros(B, cfg.enc_dim)
        c_dec = x.new_zeros(B, cfg.dec_dim)
        canvas = self.c0.expand(B, -1)
        kl = x.new_zeros(B)
        for t in range(cfg.T):
            xhat = x - torch.sigmoid(canvas)
            r = self.read(x, xhat, h_dec)
            h_enc, c_enc = self.encoder(torch.cat([r, h_dec], dim=1), (h_enc, c_enc))
            mu, logsig = self.q(h_enc).chunk(2, dim=1)
            z = mu + torch.exp(logsig) * eps[t]
            h_dec, c_dec = self.decoder(z, (h_dec, c_dec))
            canvas = canvas + self.write(h_dec)
            kl = kl + 0.5 * (mu ** 2 + torch.exp(2 * logsig) - 2 * logsig - 1).sum(dim=1)
        bce = F.binary_cross_entropy_with_logits(canvas, x, reduction="none").sum(dim=1)
        return (bce + kl).mean()

    # -- exchange with npdraw's name-keyed parameter dicts ---------------
    def _dense(self):
        """npdraw name -> nn.Linear for the plain dense layers."""
        pairs = {"q": self.q, "write": self.write_layer}
        if self.cfg.attention:
            pairs.update({"read_att": self.read_att, "write_att": self.write_att})
        return pairs

    def _lstms(self):
        """npdraw prefix -> (nn.LSTMCell, input rows, hidden size)."""
        cfg = self.cfg
        return {"enc": (self.encoder, self.read_dim + cfg.dec_dim, cfg.enc_dim),
                "dec": (self.decoder, cfg.z_dim, cfg.dec_dim)}

    @torch.no_grad()
    def load_from_npdraw(self, params: dict) -> "TorchDraw":
        """Copy npdraw parameters (NumPy arrays; CuPy arrays are fetched) into this module.

        The module takes the dtype of params["c0"] (float32 or float64) and keeps its device.
        """
        def arr(name):
            a = params[name]
            if hasattr(a, "get") and not isinstance(a, np.ndarray):  # CuPy
                a = a.get()
            return np.asarray(a)

        dtype = torch.float64 if arr("c0").dtype == np.float64 else torch.float32
        device = self.c0.device
        self.to(dtype)

        def put(dst: torch.Tensor, src: np.ndarray):
            src = torch.from_numpy(np.ascontiguousarray(src)).to(dtype=dtype, device=device)
            if tuple(dst.shape) != tuple(src.shape):
                raise ValueError(f"shape mismatch: {tuple(src.shape)} for {tuple(dst.shape)}")
            dst.copy_(src)

        put(self.c0, arr("c0"))
        put(self.h_enc0, arr("h_enc0"))
        put(self.h_dec0, arr("h_dec0"))
        for prefix, (cell, n_in, hidden) in self._lstms().items():
            Wt, b = arr(f"{prefix}_W"), arr(f"{prefix}_b")
            perm = gate_perm(hidden)
            put(cell.weight_ih, Wt[:n_in][:, perm].T)
            put(cell.weight_hh, Wt[n_in:][:, perm].T)
            put(cell.bias_ih, b[perm])
            cell.bias_hh.zero_()
        for prefix, layer in self._dense().items():
            put(layer.weight, arr(f"{prefix}_W").T)
            put(layer.bias, arr(f"{prefix}_b"))
        return self

    def grads_as_npdraw(self) -> dict:
        """The ``.grad`` of every parameter, as NumPy arrays under npdraw's names and layouts."""
        def g(p):
            if p.grad is None:
                return np.zeros(tuple(p.shape), dtype=np.float64)
            return p.grad.detach().cpu().numpy()

        out = {"c0": g(self.c0), "h_enc0": g(self.h_enc0), "h_dec0": g(self.h_dec0)}
        for prefix, (cell, _n_in, hidden) in self._lstms().items():
            perm = gate_perm(hidden)  # self-inverse
            Wt = np.concatenate([g(cell.weight_ih).T, g(cell.weight_hh).T], axis=0)
            out[f"{prefix}_W"] = Wt[:, perm]
            # Both LSTMCell biases are added to the same pre-activation; npdraw has one.
            out[f"{prefix}_b"] = g(cell.bias_ih)[perm]
        for prefix, layer in self._dense().items():
            out[f"{prefix}_W"] = g(layer.weight).T
            out[f"{prefix}_b"] = g(layer.bias)
        return out


def make_optimizer(model: TorchDraw, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8):
    """Adam over all of the model's parameters (``bias_hh`` included, as a user would)."""
    return torch.optim.Adam(model.parameters(), lr=lr, betas=betas, eps=eps)


def train_step(model: TorchDraw, opt, x: torch.Tensor, eps: torch.Tensor,
               clip: float = 10.0) -> torch.Tensor:
    """One training step: loss, backward, clip the global gradient norm, Adam update.

    Returns the loss tensor (not synchronised with the host).
    """
    opt.zero_grad(set_to_none=True)
    loss = model(x, eps)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return loss
