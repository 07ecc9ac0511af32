"""
consistency.py -- consistency distillation (CD) and consistency training (CT, iCT-style) of the EDM CIFAR-10 teacher.

A consistency model f_theta(x, sigma) maps every point of a probability-flow ODE trajectory to its end at sigma_min:
the teacher's network, wrapped so that f(x, sigma_min) = x exactly. CD pulls f_theta(x, t_{n+1}) to f_theta-(x_hat,
t_n), x_hat a Heun step of the frozen teacher from x = x0 + t_{n+1} z, theta- = sg(theta) (CM Table 3, CIFAR-10);
CT has no teacher: x_hat = x0 + t_n z, the same z, a doubling number of levels N and pseudo-Huber (iCT). Song et al.,
"Consistency Models", ICML 2023, arXiv 2303.01469; Song & Dhariwal, "Improved Techniques for Training Consistency
Models" (iCT), ICLR 2024, arXiv 2310.14189; ECT: Geng et al., "Consistency Models Made Easy", arXiv 2406.14548;
sections 1-3 of the study notes "Distilled Diffusion Models" (2024-07-03; README, "Sources"): "Eq." below is theirs.

    python consistency.py --data toy                 # CD on the 2-D mixture on a CPU, a few minutes (--mode ct: CT)
    python consistency.py --data digits              # CD (l2) on 8x8 handwritten digits on a CPU, about 2 minutes
    python consistency.py                            # CD with LPIPS, CIFAR-10 uncond, one H100; --mode ct: iCT
    python consistency.py --out R --eval-only --sample-steps 2   # 2-step FID of run R's G_ema (a row, *_2step files)
Expected: toy mode_tv < 0.05, precision > 0.7 (tests). CIFAR-10, published: CD (LPIPS) 3.55 / 2.93 (1 / 2 steps), iCT
2.83 (README). Code: Consistency (Eq. 7-8), heun_step (x_hat), cm_loss (Eq. 12, 27), distance (Eq. 43), multistep.

As openai/consistency_models: l2 is a mean over pixels (mean_flat), lpips at 224 x 224 (bilinear); N = 18. Our LPIPS
is the lpips package's VGG with max pooling, as the JAX CIFAR-10 code (openai/consistency_models_cifar10); the PyTorch
repository uses piq's LPIPS(replace_pooling=True), average pooling.
iCT's pseudo-Huber (on the sum, c = 0.00054 sqrt(dim)), curriculum and lognormal n for CT. Departures: both losses
weight by 1/(t_{n+1} - t_n) (iCT; CM's CD: 1); Adam, not RAdam; no dropout; CT starts from the teacher, as ECT does;
the toy draws n uniformly (CM), N <= 81; batch, lr, EMA and --kimg are ours. Digits: CD with l2 (LPIPS wants
3-channel images), batch 128, lr 1e-4 (CIFAR-10's), 51.2 kimg, EMA 2.5 kimg; CT's N from 10 to 160 (CIFAR-10: 1280).
"""
import argparse, collections, copy, datetime, functools, glob, inspect, io, json, math, os, pickle, resource, signal
import time, warnings
import numpy as np
import torch
import torch._dynamo   # here: imported after init_process_group (torch.optim would), it keeps gloo alive: abort at exit
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# -----------------------------------------------------------------------------
# Config: the shared flags (parser), then the consistency flags; DEFAULTS holds those that differ by --data.

DEFAULTS = {'cifar10': dict(kimg=50000, batch=512, batch_gpu=128, lr=1e-4, ema_kimg=500, eval_every=2000, log_every=100,
                            ct_scales=[10, 1280], ct_noise='lognormal'),
            'toy': dict(kimg=600, batch=256, batch_gpu=256, lr=1e-3, ema_kimg=5, eval_every=30, log_every=200,
                        ct_scales=[10, 80], ct_noise='uniform'),
            'digits': dict(kimg=51.2, batch=128, batch_gpu=128, lr=1e-4, ema_kimg=2.5, eval_every=5.12, log_every=50,
                           ct_scales=[10, 160], ct_noise='lognormal')}

def get_config(argv=None):
    p = parser(__file__, 'Consistency distillation / training of an EDM teacher.')
    A = p.add_argument_group('consistency').add_argument
    A('--mode', choices=['cd', 'ct'], default='cd', help='cd: distil the teacher (a Heun step); ct: iCT, no teacher')
    A('--loss', choices=['l2', 'huber', 'lpips'], help='metric d (default: cd lpips, on the toy l2; ct huber)')
    A('--scales', type=number(int, lambda v: v >= 2, 'an integer >= 2'), default=18, help='cd: N levels (CM: 18)')
    A('--ct-scales', type=pos_int, nargs=2, metavar=('S0', 'S1'), help='ct: N goes from S0 + 1 to S1 + 1 levels')
    A('--ct-noise', choices=['lognormal', 'uniform'], help='ct: n by the lognormal mass of its interval (iCT) or not')
    A('--sample-steps', type=pos_int, default=1, help='sampling steps in evaluation (> 1: multistep, iCT tau 0.821)')
    cfg = finish_config(p, argv, DEFAULTS)
    cfg.loss = cfg.loss or ('huber' if cfg.mode == 'ct' else 'lpips' if cfg.data == 'cifar10' else 'l2')
    if cfg.loss == 'lpips' and cfg.data != 'cifar10': p.error('--loss lpips needs --data cifar10')
    return cfg

# -----------------------------------------------------------------------------
# Consistency models: the parameterisation, the teacher's ODE step, the loss, the sampler. Tensors of any shape.

class Consistency(nn.Module):
    """f_theta = c_skip x + c_out F_theta with CM's coefficients, so that f(x, sigma_min) = x exactly (Eq. 8)."""
    def __init__(self, net):
        super().__init__()
        self.net, self.sigma_data, self.label_dim = net, net.sigma_data, net.label_dim
    def forward(self, x, sigma, class_labels=None):
        x, sigma, sd = x.float(), as_sigma(sigma, x), self.sigma_data
        c_skip, c_out = edm_precond(sigma, sd)[:2]
        F_x = (self.net(x, sigma, class_labels) - c_skip * x) / c_out                  # F_theta(c_in x, c_noise)
        cm_skip = sd ** 2 / ((sigma - SIGMA_MIN) ** 2 + sd ** 2)                     # CM's c_skip and c_out
        cm_out = (sigma - SIGMA_MIN) * sd / (sigma ** 2 + sd ** 2).sqrt()
        return cm_skip * x + cm_out * F_x

def heun_step(net, x, t_cur, t_next, class_labels=None):
    """One Heun step (EDM Algorithm 2, t_next > 0) of the probability-flow ODE dx/dt = (x - D(x; t)) / t."""
    t_cur, t_next = as_sigma(t_cur, x), as_sigma(t_next, x)
    d = (x - net(x, t_cur, class_labels).to(x.dtype)) / t_cur
    x_next = x + (t_next - t_cur) * d                                                   # Euler, then the trapezoid
    return x + (t_next - t_cur) * (d + (x_next - net(x_next, t_next, class_labels).to(x.dtype)) / t_next) / 2

def sigma_pairs(n, N, device, lognormal=False):
    """n pairs (t_{n+1}, t_n), adjacent on the N-level Karras grid; n uniform (CM) or lognormal (iCT: -1.1, 2)."""
    s = karras(torch.arange(N - 1, -1, -1, dtype=torch.float64, device=device) / (N - 1))   # s_min = t_1 < ... < t_N
    cdf = torch.erf((s.log() + 1.1) / (2 * math.sqrt(2)))                              # on the device: no host sync
    i = torch.multinomial(cdf[1:] - cdf[:-1] if lognormal else torch.ones(N - 1, device=device), n, replacement=True)
    return s[i + 1].float(), s[i].float()

def ct_scales(k, total, s0=10, s1=1280):
    """iCT's curriculum: N(k) = min(s0 2^floor(k / K'), s1) + 1 at step k, K' = floor(K / (log2 floor(s1/s0) + 1))."""
    return min(s0 * 2 ** (k // max(math.floor(total / (math.log2(s1 // s0) + 1)), 1)), s1) + 1

def distance(a, b, loss='l2', huber_c=None):
    """Per sample: CM's mean_flat squared L2, iCT's pseudo-Huber (Eq. 43), or the callable `loss` (LPIPS)."""
    if callable(loss): return loss(a, b)
    if loss == 'l2': return (a - b).pow(2).flatten(1).mean(1)
    return ((a - b).pow(2).flatten(1).sum(1) + huber_c ** 2).sqrt() - huber_c        # Eq. (43) of the notes

def cm_loss(G, target, x, t_hi, x_hat, t_lo, class_labels=None, loss='l2', huber_c=None):
    """E w d(f_theta(x, t_{n+1}), sg f_theta-(x_hat, t_n)), w = 1 / (t_{n+1} - t_n): CD, Eq. (12), with x_hat the
    teacher's Heun step from x; CT, Eq. (27), with target = sg(G) and x_hat = x0 + t_n z (Eq. 20)."""
    with torch.no_grad():
        y = target(x_hat, t_lo, class_labels)
    return (distance(G(x, t_hi, class_labels), y, loss, huber_c) / (t_hi - t_lo)).mean()

@torch.no_grad()
def multistep(G, z, c=None, steps=1, generator=None, tau_1=0.821):
    """x = f(s_max z, s_max), then x <- f(x + sqrt(tau^2 - s_min^2) n, tau), tau from tau_1 (iCT) down to s_min."""
    x, a, b = generate(G, z, c), tau_1 ** (1 / RHO), SIGMA_MIN ** (1 / RHO)
    for tau in [(a + k / (steps - 1) * (b - a)) ** RHO for k in range(steps - 1)]:
        n = torch.randn(x.shape, device=x.device, generator=generator)
        x = G(x + math.sqrt(tau ** 2 - SIGMA_MIN ** 2) * n, tau, c)
    return x

# -----------------------------------------------------------------------------
# Training: CD (Eq. 12: a teacher Heun step) or CT (Eq. 27, iCT's curriculum), both with theta- = sg(theta).

def train(cfg, extract=None):
    world = World(cfg, extract)
    G = Consistency(copy.deepcopy(world.teacher).requires_grad_(True))          # f_theta starts from the teacher
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)                       # (eval mode: no dropout)
    opt_G = torch.optim.Adam(G.parameters(), lr=cfg.lr, fused=True)
    g = torch.Generator(world.device).manual_seed(cfg.seed)

    def sampler(z, c):
        return multistep(G_ema, z, c, cfg.sample_steps, g)
    lpips = cfg.loss == 'lpips' and not cfg.eval_only                          # --eval-only needs no LPIPS
    metric = world.once(lpips_vgg, world.device, not cfg.bench) if lpips else cfg.loss
    huber_c, total = 0.00054 * math.sqrt(math.prod(world.shape)), math.ceil(cfg.kimg * 1000 / cfg.batch)
    G_c, teacher_c = world.compiled(G), world.compiled(world.teacher)
    k, B = None, world.batch                                                   # CT's step, for the curriculum

    def loss_cm(x0, c, z, t_hi, t_lo):   # one micro-batch of Eq. (12) (CD: a teacher Heun step) or Eq. (27) (CT)
        x = x0 + as_sigma(t_hi, x0) * z
        if cfg.mode == 'cd':
            with torch.no_grad():
                x_hat = heun_step(teacher_c, x, t_hi, t_lo, c)
        else:
            x_hat = x0 + as_sigma(t_lo, x0) * z                                # the same z (Eq. 20)
        loss = cm_loss(G_c, G_c, x, t_hi, x_hat, t_lo, c, metric, huber_c)
        return loss, {f'loss_{cfg.mode}': loss}

    def step():
        nonlocal k
        x0, c = world.real(B)                                                  # both modes draw x0 ~ p_data
        z = torch.randn_like(x0)
        if cfg.mode == 'cd':                                                   # n uniform on the --scales grid
            t_hi, t_lo = sigma_pairs(B, cfg.scales, world.device)
        else:
            if k is None: k = int(next(iter(opt_G.state.values()))['step']) if opt_G.state else 0   # after --resume
            t_hi, t_lo = sigma_pairs(B, ct_scales(k, total, *cfg.ct_scales), world.device, cfg.ct_noise == 'lognormal')
            k += 1
        losses = world.step(opt_G, loss_cm, x0, c, z, t_hi, t_lo)            # the same draws for any --batch-gpu
        ema_update(G_ema, G, cfg.batch, cfg.ema_kimg)
        return losses

    return fit(cfg, world, dict(G=G, G_ema=G_ema), dict(G=opt_G), step, sampler)

def main(argv=None):
    train(get_config(argv))

# ==== Everything below is identical in all five scripts: EDM network and teacher, small worlds, evaluation, plumbing

# === BEGIN SHARED: EDM network ===
# DDPM++ SongUNet and the preconditioning of EDM (Karras et al., NeurIPS 2022, arXiv 2206.00364), written anew with
# the official pickles' parameter names, so that their weights load strictly. --teacher random uses PyTorch's init.

class Conv2d(nn.Conv2d):
    """EDM's Conv2d, resampling 2x first (its [1, 1] filter, kept as a buffer: nearest up, average down)."""
    def __init__(self, cin, cout, kernel, up=False, down=False):
        super().__init__(cin, cout, kernel, padding=kernel // 2)
        self.up, self.down = up, down
        self.register_buffer('resample_filter', torch.full([1, 1, 2, 2], 0.25) if up or down else None)
    def forward(self, x):
        if self.up: x = F.interpolate(x, scale_factor=2, mode='nearest')
        if self.down: x = F.avg_pool2d(x, 2)
        return super().forward(x)

def GroupNorm(c):
    return nn.GroupNorm(min(32, c // 4), c, eps=1e-6)

class UNetBlock(nn.Module):
    """Residual block, optionally resampling, optionally followed by one-head self-attention."""
    def __init__(self, cin, cout, emb, up=False, down=False, attention=False, dropout=0.0):
        super().__init__()
        self.in_channels, self.dropout, self.attention = cin, dropout, attention
        self.norm0, self.conv0 = GroupNorm(cin), Conv2d(cin, cout, 3, up=up, down=down)
        self.affine, self.norm1, self.conv1 = nn.Linear(emb, cout), GroupNorm(cout), Conv2d(cout, cout, 3)
        self.skip = Conv2d(cin, cout, 1, up=up, down=down) if cin != cout or up or down else None
        if attention:
            self.norm2, self.qkv, self.proj = GroupNorm(cout), Conv2d(cout, 3 * cout, 1), Conv2d(cout, cout, 1)
    def forward(self, x, emb):
        h = self.conv0(F.silu(self.norm0(x)))
        h = F.silu(self.norm1(h + self.affine(emb)[:, :, None, None]))
        h = self.conv1(F.dropout(h, self.dropout, self.training))
        x = (h + (x if self.skip is None else self.skip(x))) * math.sqrt(0.5)
        if self.attention:
            B, C, H, W = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(B, C, 3, H * W).transpose(1, 3).unbind(2)   # (B, HW, C) each
            a = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]   # softmax(q k^T / sqrt C) v
            x = (self.proj(a.transpose(1, 2).reshape(B, C, H, W)) + x) * math.sqrt(0.5)
        return x

class SongUNet(nn.Module):
    """The DDPM++ U-Net F(x, c_noise); the defaults are EDM's CIFAR-10 configuration (55.7M parameters)."""
    def __init__(self, img_resolution=32, in_channels=3, out_channels=3, label_dim=0, augment_dim=9,
                 model_channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,), dropout=0.13):
        super().__init__()
        mc, emb, c, skips = model_channels, 4 * model_channels, model_channels, []
        block = functools.partial(UNetBlock, emb=emb, dropout=dropout)
        self.map_label = nn.Linear(label_dim, mc) if label_dim else None
        self.map_augment = nn.Linear(augment_dim, mc, bias=False) if augment_dim else None
        self.map_layer0, self.map_layer1 = nn.Linear(mc, emb), nn.Linear(emb, emb)
        self.enc, self.dec = nn.ModuleDict(), nn.ModuleDict()
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f'{res}x{res}_conv'] = Conv2d(in_channels, mc, 3)
            else:
                self.enc[f'{res}x{res}_down'] = block(c, c, down=True)
            skips.append(c)
            for i in range(num_blocks):
                self.enc[f'{res}x{res}_block{i}'] = block(c, mc * mult, attention=res in attn_resolutions)
                c = mc * mult
                skips.append(c)
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = block(c, c, attention=True)
                self.dec[f'{res}x{res}_in1'] = block(c, c)
            else:
                self.dec[f'{res}x{res}_up'] = block(c, c, up=True)
            for i in range(num_blocks + 1):
                attention = i == num_blocks and res in attn_resolutions
                self.dec[f'{res}x{res}_block{i}'] = block(c + skips.pop(), mc * mult, attention=attention)
                c = mc * mult
        self.dec[f'{img_resolution}x{img_resolution}_aux_norm'] = GroupNorm(c)
        self.dec[f'{img_resolution}x{img_resolution}_aux_conv'] = Conv2d(c, out_channels, 3)
    def forward(self, x, c_noise, class_labels=None, augment_labels=None, decode=True):
        half = self.map_layer0.weight.shape[1] // 2
        emb = torch.outer(c_noise.float(), (1 / 10000) ** (torch.arange(half, device=x.device) / (half - 1)))
        emb = torch.cat([emb.sin(), emb.cos()], dim=1)                  # positional embedding, (B, model_channels)
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels * math.sqrt(self.map_label.weight.shape[1]))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))   # (B, 4 * model_channels)
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        feat = x                                                        # the encoder's bottleneck: (B, 256, 8, 8)
        if not decode: return None, feat                                # a discriminator on the encoder needs no more
        blocks = list(self.dec.values())
        for block in blocks[:-2]:
            if x.shape[1] != block.in_channels: x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return blocks[-1](F.silu(blocks[-2](x))), feat

def edm_precond(sigma, sigma_data):   # EDM Table 1: D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)
    s2 = sigma ** 2 + sigma_data ** 2
    return sigma_data ** 2 / s2, sigma * sigma_data / s2.sqrt(), 1 / s2.sqrt(), sigma.log() / 4

def as_sigma(sigma, x):
    """sigma as float32 (B, 1, ..., 1) on x's device; a Python number becomes a fill, not a host-to-device copy."""
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    if torch.is_tensor(sigma): return sigma.to(x.device, torch.float32).reshape(-1, *shape[1:]).expand(shape)
    return torch.full(shape, float(sigma), device=x.device)

class EDMPrecond(nn.Module):
    """EDM's denoiser D(x, sigma); the preconditioning and the output combination run in fp32. return_features=True
    also returns the encoder's bottleneck features; 'only' returns (None, features) and skips the decoder."""
    def __init__(self, label_dim=0, sigma_data=0.5, **unet_kwargs):
        super().__init__()
        self.label_dim, self.sigma_data = label_dim, sigma_data
        self.model = SongUNet(label_dim=label_dim, **unet_kwargs)
    def forward(self, x, sigma, class_labels=None, return_features=False, augment_labels=None):
        x, sigma = x.float(), as_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = edm_precond(sigma, self.sigma_data)
        F_x, feat = self.model(c_in * x, c_noise.flatten(), class_labels, augment_labels, return_features != 'only')
        D_x = None if F_x is None else c_skip * x + c_out * F_x.float()
        return (D_x, feat.float()) if return_features else D_x
# === END SHARED: EDM network ===

# === BEGIN SHARED: EDM teacher ===
# load_edm: the official pickle, read without EDM's code; noise levels, one-step generator, loss, sampler, training.

EDM_URL = 'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/'
EDM_UNCOND, EDM_COND = EDM_URL + 'edm-cifar10-32x32-uncond-vp.pkl', EDM_URL + 'edm-cifar10-32x32-cond-vp.pkl'
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0

def cache_dir():   # downloads, the toy teacher, teacher pairs: ~/.cache/distill, or $DISTILL_CACHE
    d = os.environ.get('DISTILL_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'distill'))
    os.makedirs(d, exist_ok=True)
    return d

def download(url, dst):   # with a progress bar, through a temp file and a rename: a broken transfer leaves nothing
    if os.path.exists(dst): return dst
    try:
        torch.hub.download_url_to_file(url, dst, progress=True)
    except Exception as e:
        raise SystemExit(f'error: could not download {url} ({e}). Download it by hand and put it at {dst}')
    return dst

class _Stub(nn.Module):   # stands in for the official pickle's classes: keeps their name and state, runs nothing
    def __init__(self, class_name, state):                      # (a module's state: its state_dict() works)
        self.__setstate__({**state, 'class_name': class_name})

class _SafeUnpickler(pickle.Unpickler):
    """EDM's pickles without dnnlib and torch_utils, CIFAR-10's batches: EDM's persistent objects (whose source EDM
    would exec()) become _Stubs, tensors and arrays are rebuilt from bytes, and any other global is refused."""
    ALLOWED = {('collections', 'OrderedDict'): collections.OrderedDict, ('numpy', 'ndarray'): np.ndarray,
               ('torch._utils', '_rebuild_tensor_v2'): torch._utils._rebuild_tensor_v2,
               ('torch._utils', '_rebuild_parameter'): torch._utils._rebuild_parameter,
               ('torch.storage', '_load_from_bytes'): lambda b: torch.load(io.BytesIO(b), weights_only=True),
               ('torch_utils.persistence', '_reconstruct_persistent_obj'):
                   lambda m: _Stub(m['class_name'], m['state']),
               **{(m, f): v for m in ('numpy.core.multiarray', 'numpy._core.multiarray') for f, v in
                  (('scalar', lambda dtype, b: np.frombuffer(b, dtype)[0]), ('_reconstruct', np.ndarray.__new__))},
               ('dnnlib.util', 'EasyDict'): dict, ('numpy', 'dtype'): np.dtype, ('builtins', 'set'): set,
               ('_codecs', 'encode'): lambda s, encoding: s.encode(encoding)}           # bytes in protocol 2
    def find_class(self, module, name):
        if (module, name) in self.ALLOWED: return self.ALLOWED[module, name]
        if module.startswith('torch.nn.modules.'): return _Stub                # ModuleDict and co.
        if module == 'torch' and isinstance(getattr(torch, name, None), torch.dtype): return getattr(torch, name)
        raise pickle.UnpicklingError(f'refusing to load global {module}.{name}')

def load_data(path, **kwargs):   # a checkpoint (.pt: torch's weights-only loader) or a pickle; code in it is refused
    try:
        if path.endswith('.pt'): return torch.load(path, map_location='cpu', weights_only=True, **kwargs)
        with open(path, 'rb') as f:
            return _SafeUnpickler(f, **kwargs).load()
    except pickle.UnpicklingError as e:                         # a global (a call, which could run code), a cut file
        words = str(e).split()                                  # torch's long text names the global after GLOBAL
        why = f"it names the global {words[words.index('GLOBAL') + 1]}" if 'GLOBAL' in words else str(e).splitlines()[0]
        raise SystemExit(f'error: {path} is refused, {why}: a file that runs code is never loaded here')

def load_edm(source, device='cpu'):
    """EDMPrecond in eval mode from an official network pickle: a URL (downloaded to the cache) or a file."""
    if source.startswith(('http://', 'https://')):
        source = download(source, os.path.join(cache_dir(), os.path.basename(source)))
    if not os.path.isfile(source):
        raise SystemExit(f'error: teacher file {source} not found; pass a URL or an EDM .pkl (official: {EDM_UNCOND})')
    try:
        with open(source, 'rb') as f:
            ema = _SafeUnpickler(f).load()['ema']                                    # EDM's network pickle entry
        if not (isinstance(ema, _Stub) and ema.class_name == 'EDMPrecond'):
            raise ValueError(f"'ema' is {getattr(ema, 'class_name', type(ema).__name__)}, not an EDMPrecond")
        init = getattr(ema._modules['model'], '_init_kwargs', {})          # not DDPM++: strict loading names the keys
        kwargs = {k: v for k, v in init.items() if k in inspect.signature(SongUNet).parameters and k != 'label_dim'}
        net = EDMPrecond(label_dim=int(ema.label_dim), sigma_data=float(ema.sigma_data), **kwargs)
        net.load_state_dict(ema.state_dict(), strict=True)
    except (pickle.UnpicklingError, KeyError, ValueError, RuntimeError, EOFError, AttributeError, TypeError) as e:
        why = ' '.join(str(e).split())[:300]                                      # one line: torch's text has \n\t
        raise SystemExit(f'error: {source} is not a usable EDM network ({type(e).__name__}: {why}). '
                         'Delete it to re-download, or pass another --teacher.')
    return net.eval().requires_grad_(False).to(device)

def karras(u):   # EDM Eq. (5): the noise level at u in [0, 1] of the ramp from SIGMA_MAX down to SIGMA_MIN
    return (SIGMA_MAX ** (1 / RHO) + u * (SIGMA_MIN ** (1 / RHO) - SIGMA_MAX ** (1 / RHO))) ** RHO

def sample_sigma(n, device, u_min=0.02, u_max=0.98):   # sigma = karras(u), u ~ U[u_min, u_max]
    return karras(torch.empty(n, device=device).uniform_(u_min, u_max))

def generate(G, z, c=None, sigma=SIGMA_MAX):   # a one-step generator from a denoiser: G(z) = D(sigma z, sigma)
    return G(z * sigma, sigma, c)

def edm_loss(net, x, sigma, n, class_labels=None, augment_labels=None):   # EDM's lambda(sigma) ||D(x + sigma n) - x||^2
    sigma = as_sigma(sigma, x)
    D = net(x + sigma * n, sigma, class_labels, augment_labels=augment_labels)
    lam = (sigma ** 2 + net.sigma_data ** 2) / (sigma * net.sigma_data) ** 2
    return (lam * (D - x) ** 2).mean()

@torch.no_grad()
def heun_sample(net, z, class_labels=None, steps=18):
    """EDM Algorithm 2: the deterministic Heun sampler, 2 steps - 1 network evaluations (35 at 18 steps)."""
    t = F.pad(karras(torch.arange(steps, dtype=torch.float64) / (steps - 1)), (0, 1)).to(z.device)   # t_N = 0
    x = z.to(torch.float64) * t[0]
    for i in range(steps):
        d = (x - net(x, t[i], class_labels).to(torch.float64)) / t[i]           # dx/dt = (x - D(x; t)) / t
        x_next = x + (t[i + 1] - t[i]) * d
        if t[i + 1] > 0:                                                         # the 2nd-order correction
            d2 = (x_next - net(x_next, t[i + 1], class_labels).to(torch.float64)) / t[i + 1]
            x_next = x + (t[i + 1] - t[i]) * (d + d2) / 2
        x = x_next
    return x.float()

def train_teacher(net, sample, path, steps, batch):
    """A teacher trained here (toy, digits) by edm_loss at EDM's lognormal sigma on sample(batch); cached at path."""
    if not os.path.exists(path):
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
        for _ in tqdm(range(steps), desc=f'training {os.path.basename(path)} (once, cached)', leave=False):
            sigma = (torch.randn(batch) * 1.2 - 1.2).exp()                      # EDM: ln sigma ~ N(-1.2, 1.2^2)
            x, c = sample(batch)
            loss = edm_loss(net, x, sigma, torch.randn_like(x), c)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        atomic_save({'state_dict': net.state_dict()}, path)
    net.load_state_dict(torch.load(path, weights_only=True)['state_dict'])
    return net.eval().requires_grad_(False)
# === END SHARED: EDM teacher ===

# === BEGIN SHARED: small worlds ===
# On a CPU, each with a teacher trained here, as CIFAR-10 has EDM's: a 2-D Gaussian mixture with an exact (noisy)
# density, the tests' ground truth, and scikit-learn's 1,797 8x8 handwritten digits (the UCI set, CC BY 4.0).

class GaussianMixture2D:   # k Gaussians of std `std` on a circle of radius `radius`, weighted 1 : 2 : ... : k
    def __init__(self, k=8, radius=2.0, std=0.1, tilt=0.0):
        angle = torch.arange(k, dtype=torch.float64) * 2 * math.pi / k
        self.means, self.std = radius * torch.stack([angle.cos(), angle.sin()], 1), std      # (K, 2)
        self.weights = self.untilted = torch.arange(1, k + 1, dtype=torch.float64) / (k * (k + 1) / 2)
        # tilt beta: the mixture times exp(beta x[0]), normalised, is again one (dibregman.py's reward-tilted target)
        if tilt: self.weights = (self.weights.log() + tilt * self.means[:, 0]).softmax(0)  # w_k exp(beta m_k[0]) / Z
        if tilt: self.means = self.means + torch.tensor([tilt * std ** 2, 0.0], dtype=torch.float64)   # + beta std^2
        self.sigma_data = float((self.weights @ self.means.pow(2)).mean() + std ** 2) ** 0.5
    def sample(self, n, generator=None):
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        return (self.means[k] + self.std * torch.randn(n, 2, dtype=torch.float64, generator=generator)).float()
    def log_prob(self, x, sigma=0.0):   # log sum_k w_k N(x; m_k, (std^2 + sigma^2) I)
        var = self.std ** 2 + torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1) ** 2
        d2 = (x.double()[:, None, :] - self.means.to(x.device)).pow(2).sum(-1)
        return (self.weights.to(x.device).log() - d2 / (2 * var) - torch.log(2 * math.pi * var)).logsumexp(1)
    def metrics(self, x):
        """Exact quality of samples x (N, 2): mode_tv, precision (within 3 std of a mean), nll."""
        d = (x.double()[:, None, :] - self.means).norm(dim=-1)                              # (N, K)
        freq = torch.bincount(d.argmin(1), minlength=len(self.weights)).double() / len(x)
        m = dict(mode_tv=0.5 * (freq - self.weights).abs().sum().item(),
                 precision=(d.min(1).values < 3 * self.std).double().mean().item(),
                 nll=-self.log_prob(x).clamp_min(-1e4).mean().item())
        if self.weights is not self.untilted: m['mode_tv_untilted'] = 0.5 * (freq - self.untilted).abs().sum().item()
        return m

class ToyDenoiser(nn.Module):
    """A 3x256 MLP F(c_in x, c_noise) with EDM's preconditioning and EDMPrecond's call signature."""
    def __init__(self, sigma_data=1.0, dim=2, width=256, depth=3):
        super().__init__()
        self.sigma_data, self.label_dim = sigma_data, 0
        self.register_buffer('freqs', 2.0 ** torch.arange(8))                              # Fourier features of c_noise
        self.inp, self.out = nn.Linear(dim + 16, width), nn.Linear(width, dim)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 1))
    def forward(self, x, sigma, class_labels=None, return_features=False, augment_labels=None):
        x, sigma = x.float(), as_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = edm_precond(sigma, self.sigma_data)
        e = c_noise * self.freqs                                                            # (B, 8)
        h = F.silu(self.inp(torch.cat([c_in * x, e.sin(), e.cos()], 1)))
        for layer in self.hidden:
            h = F.silu(layer(h))                                                            # (B, width): the features
        D_x = c_skip * x + c_out * self.out(h)
        return (D_x, h) if return_features else D_x

def toy_teacher(steps=3000, batch=1024, seed=0):   # ToyDenoiser trained by train_teacher
    torch.manual_seed(seed)
    mixture = GaussianMixture2D()
    path = os.path.join(cache_dir(), f'toy_teacher_v2_{steps}_{seed}.pt')
    return train_teacher(ToyDenoiser(mixture.sigma_data), lambda n: (mixture.sample(n), None), path, steps, batch)

def draw_toy(ax, mixture, x, title):   # samples x (N, 2) over the contours of the mixture's exact density, and metrics
    xx, yy = torch.meshgrid(torch.linspace(-3, 3, 200), torch.linspace(-3, 3, 200), indexing='xy')
    log_p = mixture.log_prob(torch.stack([xx.flatten(), yy.flatten()], 1)).reshape(200, 200)
    ax.clear()
    ax.contour(xx, yy, log_p.clamp_min(-12), levels=12, cmap='Blues', linewidths=0.7)
    ax.scatter(x[:, 0], x[:, 1], s=1, c='tab:red', alpha=0.4)
    ax.set(xlim=(-3, 3), ylim=(-3, 3), aspect='equal', xticks=[], yticks=[])
    m = mixture.metrics(x)
    ax.set_title(f"{title}, {len(x)} samples\nmode_tv {m['mode_tv']:.3f}  precision {m['precision']:.2f}", fontsize=9)

DIGITS_UNET = dict(img_resolution=8, in_channels=1, out_channels=1, augment_dim=0, model_channels=32,
                   channel_mult=(1, 2), num_blocks=1, attn_resolutions=(), dropout=0.0)       # 0.7M parameters

def load_digits():   # uint8 (1797, 1, 8, 8), the 17 grey levels 0..16 spread over 0..255, and the int64 labels
    from sklearn.datasets import load_digits as sklearn_digits
    d = sklearn_digits()
    return torch.from_numpy(np.round(d.images * 255 / 16).astype(np.uint8))[:, None], torch.from_numpy(d.target)

def digits_teacher(cond=False, steps=2000, seed=0):   # EDMPrecond at DIGITS_UNET, trained by train_teacher
    torch.manual_seed(seed)
    x, y = load_digits()
    def sample(n):
        i = torch.randint(len(x), (n,))
        return x[i].float() / 127.5 - 1, F.one_hot(y[i], 10).float() if cond else None
    path = os.path.join(cache_dir(), f"digits_teacher_{'cond' if cond else 'uncond'}_{steps}_{seed}.pt")
    return train_teacher(EDMPrecond(label_dim=10 * cond, **DIGITS_UNET), sample, path, steps, 128)

def frechet(a, b):   # the Frechet distance between Gaussians fitted to features a (N, D) and b, or b's (mean, cov)
    from cleanfid.fid import frechet_distance
    mu, cov = b if isinstance(b, tuple) else (b.mean(0), np.cov(b, rowvar=False))
    with warnings.catch_warnings(action='ignore'):              # sqrtm warns on a singular covariance (a blur's)
        return float(frechet_distance(a.mean(0), np.cov(a, rowvar=False), mu, cov))

class DigitsJudge:
    """The digits' judge: scikit-learn's MLP of the pixels (64 hidden units), fit on 1,500 digits, tested on the other
    297. metrics(uint8 (N, 1, 8, 8)): class_tv (of the predicted class frequencies), confident (p >= 0.9), fd_data and
    fd_teacher (Frechet distances of the hidden features), label_acc (--cond); the README defines each."""
    def __init__(self, images, labels):
        from sklearn.neural_network import MLPClassifier
        x, y, i = images.flatten(1).numpy() / 127.5 - 1, labels.numpy(), np.random.default_rng(0).permutation(1797)
        self.mlp = MLPClassifier((64,), alpha=1e-2, max_iter=500, random_state=0).fit(x[i[:1500]], y[i[:1500]])
        self.accuracy, self.data_freq = self.mlp.score(x[i[1500:]], y[i[1500:]]), np.bincount(y, minlength=10) / len(y)
        self.data_features = self.features(images)[0]
    def features(self, images):   # (hidden features (N, 64), class probabilities (N, 10))
        x = images.cpu().flatten(1).numpy() / 127.5 - 1
        return np.maximum(x @ self.mlp.coefs_[0] + self.mlp.intercepts_[0], 0), self.mlp.predict_proba(x)
    def metrics(self, images, labels=None, reference=None):
        h, p = self.features(images)
        m = dict(class_tv=0.5 * np.abs(np.bincount(p.argmax(1), minlength=10) / len(p) - self.data_freq).sum(),
                 confident=(p.max(1) >= 0.9).mean(), fd_data=frechet(h, self.data_features))
        if reference is not None: m['fd_teacher'] = frechet(h, self.features(reference)[0])
        if labels is not None: m['label_acc'] = (p.argmax(1) == labels.cpu().numpy()).mean()
        return {k: float(v) for k, v in m.items()}
# === END SHARED: small worlds ===

# === BEGIN SHARED: data and evaluation ===
# CIFAR-10 as one uint8 tensor on the device; LPIPS; FID in clean-fid's 'legacy_tensorflow' and 'clean' modes.

CIFAR_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
INCEPTION_URL = 'https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt'
VGG_URL = 'https://download.pytorch.org/models/vgg16-397923af.pth'

def load_cifar10(root):
    """CIFAR-10's training set as uint8 (50000, 3, 32, 32) and int64 labels; torchvision downloads it."""
    folder = os.path.join(root, 'cifar-10-batches-py')
    if not os.path.isdir(folder):
        from torchvision.datasets.utils import download_and_extract_archive
        try:
            download_and_extract_archive(CIFAR_URL, root, md5='c58f30108f718f92721af3b95e74349a')
        except Exception as e:
            raise SystemExit(f'error: could not download CIFAR-10 ({e}). Put {CIFAR_URL} into {root} '
                             f'(it is extracted to {folder})')
    files = [os.path.join(folder, f'data_batch_{i}') for i in range(1, 6)]
    batches = [load_data(f, encoding='latin1') for f in files]            # pickled dicts of numpy arrays and lists
    x = np.concatenate([np.asarray(b['data'], dtype=np.uint8).reshape(-1, 3, 32, 32) for b in batches])
    return torch.from_numpy(x), torch.tensor([y for b in batches for y in b['labels']])

def lpips_vgg(device, pretrained=True):
    """d(a, b) per sample: LPIPS-VGG (the lpips package) at 224 x 224, bilinear, as in openai/consistency_models;
    torchvision's VGG-16 weights come into the cache (not pretrained: a random VGG, as costly, for --bench)."""
    import lpips
    net = lpips.LPIPS(net='vgg', pnet_rand=True, verbose=False)                      # with its own linear heads
    if pretrained:
        vgg = torch.load(download(VGG_URL, os.path.join(cache_dir(), os.path.basename(VGG_URL))), weights_only=True)
        net.net.load_state_dict({k: vgg['features.' + k.split('.', 1)[1]] for k in net.net.state_dict()})   # slice*.i
    net = net.eval().requires_grad_(False).to(device)
    def distance(a, b):
        return net(F.interpolate(a, size=224, mode='bilinear'), F.interpolate(b, size=224, mode='bilinear')).flatten()
    return distance

def to_uint8(x):
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

def clean_fid_extractor(device):
    """extract(uint8 (N, 3, H, W), mode) -> 2048-d pool3 features of clean-fid's Inception: 'legacy_tensorflow'
    resizes inside the network as TensorFlow did, 'clean' with PIL bicubic first."""
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import build_resizer
    download(INCEPTION_URL, os.path.join(cache_dir(), 'inception-2015-12-05.pt'))
    net, resize = InceptionV3W(cache_dir(), download=False).to(device).eval(), build_resizer('clean')
    def extract(x, mode):
        if mode == 'clean': x = torch.stack([torch.from_numpy(resize(im.permute(1, 2, 0).numpy())).permute(2, 0, 1)
                                             for im in x.cpu()])
        net.resize_inside = mode == 'legacy_tensorflow'
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            return net(x.to(device)).cpu().numpy()                                      # (N, 2048)
    return extract

def fid(sample_batches, extract, ref_path, real_batches):
    """FID in both modes of uint8 batches; the statistics of real_batches() are cached at ref_path, one per mode."""
    out = {}
    for mode in ('legacy_tensorflow', 'clean'):
        path = ref_path.format(mode=mode)
        if not os.path.exists(path):
            batches = tqdm(real_batches(), desc=f'FID reference statistics ({mode})', leave=False)
            f = np.concatenate([extract(b, mode) for b in batches]).astype(np.float64)
            np.savez(path, mu=f.mean(0), sigma=np.cov(f, rowvar=False))
        ref = np.load(path)
        f = np.concatenate([extract(b, mode) for b in sample_batches]).astype(np.float64)
        out['fid_' + mode.split('_')[0]] = frechet(f, (ref['mu'], ref['sigma']))
    return out
# === END SHARED: data and evaluation ===

# === BEGIN SHARED: run plumbing ===
# Flags, device, EMA, checkpoints, and fit(): the loop (logs, NaN stop, evaluation, --resume, --bench) of every method.

def number(cast, ok, what):   # an argparse type: cast(s), finite and ok, else an error saying it must be `what`
    def numeric(s):
        v = cast(s)                                                     # a ValueError: "invalid numeric value: 'abc'"
        if not (math.isfinite(v) and ok(v)): raise argparse.ArgumentTypeError(f'{s!r} must be {what}')
        return v
    return numeric

pos_int, nonneg_int = number(int, lambda v: v > 0, 'positive'), number(int, lambda v: v >= 0, 'an integer >= 0')
pos_float, nonneg_float = number(float, lambda v: v > 0, 'positive'), number(float, lambda v: v >= 0, 'a number >= 0')

def device(s):   # an argparse type: a device that torch knows and this machine has
    try:
        d = torch.device(s)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f'{s!r} is not a device: cpu, cuda, cuda:1, ...')
    if d.type != 'cuda' or (d.index or 0) < torch.cuda.device_count(): return s
    raise argparse.ArgumentTypeError(f'{s!r}: this machine has {torch.cuda.device_count()} CUDA GPUs')

def parser(file, description):   # the script's argument parser, with the shared flags
    p = argparse.ArgumentParser(prog=os.path.basename(file), description=description)
    A = p.add_argument_group('run (the same in every script)').add_argument
    A('--data', choices=['cifar10', 'digits', 'toy'], default='cifar10', help='CIFAR-10 (GPU), 8x8 digits, 2-D (CPU)')
    A('--teacher', help="EDM teacher: a URL, an official .pkl or 'random' (default: EDM's own; toy, digits: made here)")
    A('--cond', action='store_true', help='class-conditional teacher and generator (CIFAR-10, digits)')
    A('--out', help='run directory (default runs/<script>-<data>)')
    A('--kimg', type=pos_float, help='training length, thousands of generator images')
    A('--batch', type=pos_int, help='batch size of one update, over all GPUs')
    A('--batch-gpu', type=pos_int, help='micro-batch: samples per pass on one GPU; gradients add up to --batch')
    A('--lr', type=pos_float, help='generator learning rate')
    A('--ema-kimg', type=nonneg_float, help='half-life of the generator EMA, kimg')
    A('--seed', type=nonneg_int, default=0, help='random seed')
    A('--resume', action='store_true', help='continue from the checkpoint in --out')
    A('--eval-only', action='store_true', help="score the G_ema of the checkpoint in --out, with its run's settings")
    A('--eval-every', type=pos_float, help='evaluate every this many kimg (and checkpoint five times as often)')
    A('--log-every', type=pos_int, help='log every this many steps')
    A('--fid-samples', type=nonneg_int, default=10000, help='samples for FID during training (0: none)')
    A('--fid-final', type=nonneg_int, default=50000, help='samples for FID at the end (0: none)')
    A('--data-dir', help='folder holding CIFAR-10 (downloaded there if absent; default: the cache)')
    A('--model-channels', type=pos_int, default=128, help='SongUNet width for --teacher random')
    A('--bench', type=nonneg_int, default=0, metavar='N', help='time N training steps on random data and exit')
    A('--precision', choices=['auto', 'bf16', 'tf32', 'fp32'], default='auto', help='auto: bf16 autocast on a GPU')
    A('--compile', action='store_true', help='torch.compile the networks')
    A('--device', type=device, help='cuda, cuda:1, cpu, ... (default: cuda if available)')
    return p

def finish_config(p, argv, defaults):   # parses argv and fills what the user left unset from defaults[--data]
    for a in p._actions:                                                # --help shows the defaults (of both worlds)
        if a.dest in defaults['cifar10']:
            a.default = argparse.SUPPRESS
            a.help += ' (' + ', '.join(f'{world}: {d[a.dest]}' for world, d in defaults.items()) + ')'
        elif a.default not in (None, argparse.SUPPRESS) and a.default is not False: a.help += f' (default: {a.default})'
    cfg = p.parse_args(argv)
    for k, v in defaults[cfg.data].items():
        if getattr(cfg, k, None) is None: setattr(cfg, k, v)
    cfg.world_size = int(os.environ.get('WORLD_SIZE', 1))                # processes under torchrun
    if cfg.batch % cfg.world_size: p.error(f'--batch {cfg.batch} does not split evenly over {cfg.world_size} GPUs')
    cfg.batch_gpu = min(cfg.batch_gpu, cfg.batch // cfg.world_size)
    if cfg.data == 'toy' and cfg.cond: p.error('--cond needs images: --data cifar10 or digits')
    cifar_teacher = 'random' if cfg.bench else EDM_COND if cfg.cond else EDM_UNCOND
    cfg.teacher = cfg.teacher or (cifar_teacher if cfg.data == 'cifar10' else cfg.data)   # toy, digits: trained here
    cfg.script = os.path.splitext(os.path.basename(p.prog))[0]
    cfg.out = cfg.out or os.path.join('runs', f'{cfg.script}-{cfg.data}')
    if os.path.isfile(cfg.out): p.error(f'--out {cfg.out} is a file; name a folder for the run')
    path = os.path.join(cfg.out, 'ckpt.pt')
    if not (cfg.resume or cfg.eval_only): return cfg
    if not os.path.exists(path): raise SystemExit(f'error: no checkpoint {path} to --resume or --eval-only')
    saved = load_data(path, mmap=True)['cfg']                            # reads the settings alone
    if saved.get('script') != cfg.script: raise SystemExit(f"error: {path} was written by {saved.get('script')}.py")
    given = {k: v for k, v in vars(cfg).items() if k in RESUMABLE and v is not None}   # what this command may change
    return argparse.Namespace(**{**saved, **given}) if cfg.eval_only else cfg   # eval-only: the checkpoint's world

@torch.no_grad()
def ema_update(ema, net, batch, half_life_kimg):   # EDM's EMA: ema <- ema + (1 - beta) (net - ema), a half-life in kimg
    beta = 0.5 ** (batch / max(half_life_kimg * 1000, 1e-8))
    torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - beta)

def atomic_save(obj, path):   # through a temp file and a rename: a crash mid-write leaves the previous file intact
    torch.save(obj, path + '.tmp')
    os.replace(path + '.tmp', path)

class World:
    """This process (device, precision, rank under torchrun), the teacher, data, noise, one update, evaluation."""
    def __init__(self, cfg, extract=None):
        self.cfg, self.extract = cfg, extract
        self.rank, self.batch = int(os.environ.get('RANK', 0)), cfg.batch // cfg.world_size   # this process's share
        self.device = torch.device(cfg.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
        if self.device.type == 'cuda' and self.device.index is None:
            self.device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        if cfg.data == 'cifar10' and self.device.type == 'cpu' and not (cfg.device or cfg.bench or cfg.eval_only):
            raise SystemExit(f'error: no GPU. On a CPU this CIFAR-10 run takes {cfg.kimg / 6300:.2g} years (5 s per '
                             f'image, 2 cores) and {3 + 0.3 * cfg.batch_gpu:.0f} GiB; try --data toy, or --device cpu')
        self.bf16 = cfg.precision == 'bf16' or (cfg.precision == 'auto' and self.device.type == 'cuda')
        if self.device.type == 'cuda':
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.precision != 'fp32'
        if cfg.world_size > 1 and not torch.distributed.is_initialized():   # NCCL on GPUs, gloo on CPUs
            backend = 'nccl' if self.device.type == 'cuda' else 'gloo'
            torch.distributed.init_process_group(backend, timeout=datetime.timedelta(hours=1))
        torch.manual_seed(cfg.seed)                                     # a random teacher is the same on every rank
        self.judge = self.reference = None                              # digits: the classifier, the teacher's samples
        if cfg.data == 'toy':
            self.teacher, self.mixture, self.shape = self.once(toy_teacher), GaussianMixture2D(), (2,)
            self.target = self.mixture                                  # what evaluation scores (a method may tilt it)
        else:
            digits, self.shape = cfg.data == 'digits', (1, 8, 8) if cfg.data == 'digits' else (3, 32, 32)
            if cfg.teacher == 'random':
                net = DIGITS_UNET if digits else dict(model_channels=cfg.model_channels)
                self.teacher = EDMPrecond(label_dim=10 * cfg.cond, **net)
            elif cfg.teacher == 'digits':
                self.teacher = self.once(digits_teacher, cfg.cond)
            else:
                self.teacher = self.once(load_edm, cfg.teacher)
            fake = torch.randint(0, 256, (1024, *self.shape), dtype=torch.uint8), torch.randint(10, (1024,))  # --bench
            real = load_digits if digits else functools.partial(self.once, load_cifar10, cfg.data_dir or cache_dir())
            x, y = fake if cfg.bench else real()
            self.images, self.labels = x.to(self.device), y.to(self.device)   # held on the device: no data loader
            if digits and self.rank == 0: self.judge = DigitsJudge(x, y)
        self.teacher = self.teacher.eval().requires_grad_(False).to(self.device)
        self.label_dim = self.teacher.label_dim
        torch.manual_seed(cfg.seed + 1000 * self.rank)                 # the training noise, each rank its own
    def once(self, make, *args):   # downloads and caches: rank 0 makes them while the others wait, then they read
        if self.rank: torch.distributed.barrier()
        made = make(*args)
        if self.rank == 0 and self.cfg.world_size > 1: torch.distributed.barrier()
        return made
    def autocast(self):
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16)
    def step(self, opt, loss_fn, *batch, clip=0.0):
        """One update of opt: loss_fn(*micro) -> (loss, logs) on each --batch-gpu rows of this process's batch tensors
        (batch[0] is one; None stays None); gradients weighted by rows, rank-averaged, clipped; returns mean logs."""
        opt.zero_grad(set_to_none=True)
        parts, logs = [None if t is None else t.split(self.cfg.batch_gpu) for t in batch], {}
        for i in range(len(parts[0])):
            micro = [None if t is None else t[i] for t in parts]
            share = len(micro[0]) / len(batch[0])
            loss, out = loss_fn(*micro)
            (loss * share).backward()
            logs = {k: logs.get(k, 0) + v.detach() * share for k, v in out.items()}
        params = [p for g in opt.param_groups for p in g['params'] if p.grad is not None]
        if self.cfg.world_size > 1:                                     # the mean over ranks: a sum of g / K
            for p in params:
                torch.distributed.all_reduce(p.grad.div_(self.cfg.world_size))
        if clip: torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        return logs
    def compiled(self, net):   # net for the training step: torch.compile'd with --compile
        return torch.compile(net) if self.cfg.compile else net
    def real(self, n):   # n real samples and one-hot labels: the mixture's, or images in [-1, 1] (CIFAR-10: x-flips)
        if self.cfg.data == 'toy': return self.mixture.sample(n).to(self.device), None
        i = torch.randint(len(self.images), (n,), device=self.device)
        x = self.images[i].float() / 127.5 - 1
        x = torch.where((torch.rand(n, 1, 1, 1, device=self.device) < 0.5) & (self.cfg.data == 'cifar10'), x.flip(3), x)
        return x, F.one_hot(self.labels[i], 10).float() if self.label_dim else None
    def randn(self, n, generator=None):   # n draws of N(0, I) in the data's shape
        return torch.randn(n, *self.shape, device=self.device, generator=generator)
    def noise(self, n, generator=None):   # the generator's input: z ~ N(0, I), and one-hot labels (or None)
        z = self.randn(n, generator)
        if not self.label_dim: return z, None
        return z, F.one_hot(torch.randint(10, (n,), device=self.device, generator=generator), 10).float()
    @torch.no_grad()
    def evaluate(self, sampler, step, final=False):
        """A row of metrics.jsonl, by rank 0 alone, from one-step samples of fixed noise (own RNGs: the training RNG
        is untouched): the toy's exact metrics, the digits' judge, CIFAR-10's FID; a frame of the run's animation."""
        cfg, kimg = self.cfg, round(step * self.cfg.batch / 1000, 3)
        steps = getattr(cfg, 'sample_steps', 1)                        # consistency.py's multistep sampling
        tag = f'_{steps}step' if steps > 1 else ''
        if self.rank: return
        with self.autocast():
            metrics = (self.evaluate_toy if cfg.data == 'toy' else self.evaluate_images)(sampler, kimg, final, tag)
        row = dict(kimg=kimg, step=step, sample_steps=steps, **metrics, final=final, eval_only=cfg.eval_only)
        if final and not cfg.eval_only:                                 # training.gif: the frames, one per evaluation
            from PIL import Image
            gif = [Image.open(f) for f in sorted(glob.glob(os.path.join(glob.escape(cfg.out), 'frames', '*.png')))]
            gif[0].save(os.path.join(cfg.out, 'training.gif'), save_all=True, append_images=gif[1:], duration=250)
        print(json.dumps(row), file=open(os.path.join(cfg.out, 'metrics.jsonl'), 'a'), flush=True)
        tqdm.write('eval  ' + '  '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in row.items()))
        return row
    def evaluate_toy(self, sampler, kimg, final, tag):   # frames/kimg<kimg>.npy, .png; at the end toy_samples<tag>.*
        from matplotlib.figure import Figure                            # no pyplot: files only, no screen
        z = torch.randn(10000, 2, generator=torch.Generator().manual_seed(123))[:10000 if final else 4000]
        x, ax = sampler(z.to(self.device), None).cpu(), Figure(figsize=(4, 4)).subplots()
        out = [] if self.cfg.eval_only else [(x[:4000], os.path.join(self.cfg.out, 'frames', f'kimg{kimg:010.3f}'))]
        if final: out.append((x, os.path.join(self.cfg.out, f'toy_samples{tag}')))   # the samples the row scores
        for x_out, path in out:                                         # a frame (of training.gif), then the 10k
            np.save(path + '.npy', x_out.numpy())
            draw_toy(ax, self.target, x_out, f'{self.cfg.script}{tag}, kimg {kimg:g}')
            ax.figure.savefig(path + '.png', dpi=100)
        return dict(samples=len(x), **self.target.metrics(x))
    def evaluate_images(self, sampler, kimg, final, tag):
        """samples<tag>.png, a frame of training.gif: one-step samples of fixed noise (digits: above the teacher's Heun
        samples of that noise); FID (CIFAR-10) or the judge (digits) of --fid-samples (at the end --fid-final, .npz)."""
        from torchvision.utils import make_grid, save_image
        cfg, g = self.cfg, torch.Generator(self.device).manual_seed(123)
        z, c = self.noise(2000 if self.judge else 64, g)
        if self.judge and self.reference is None:                       # the distillation's target, made once
            self.reference = to_uint8(heun_sample(self.teacher, z, c))
        x = to_uint8(sampler(z[:64], None if c is None else c[:64]))
        if self.judge: x = torch.cat([x, self.reference[:64]])         # 8 rows of samples, 8 of the teacher's below
        grid = make_grid(F.interpolate(x, size=32), pad_value=255).float() / 255          # (C, H, W)
        save_image(grid, os.path.join(cfg.out, f'samples{tag}.png'))
        if not cfg.eval_only: save_image(grid, os.path.join(cfg.out, 'frames', f'kimg{kimg:010.3f}.png'))
        n = cfg.fid_final if final else cfg.fid_samples
        if not n: return {}
        images, labels = [], []
        for i in tqdm(range(0, n, 500), desc=f'{n} samples to score', leave=False):
            z, c = self.noise(min(500, n - i), g)
            images.append(to_uint8(sampler(z, c)))
            labels.append(None if c is None else c.argmax(1).cpu())
        images, labels = torch.cat(images), torch.cat(labels) if self.label_dim else None
        if final:                                                       # the evaluator's format: uint8 N x H x W x C
            arrays = [images.permute(0, 2, 3, 1).cpu().numpy()] + ([labels.numpy()] if self.label_dim else [])
            np.savez(os.path.join(cfg.out, f'samples_{kimg:g}kimg{tag}.npz'), *arrays)   # arr_0, arr_1 (labels)
        if self.judge: return dict(samples=n, **self.judge.metrics(images, labels, self.reference))
        self.extract = self.extract or clean_fid_extractor(self.device)
        ref = os.path.join(cache_dir() if cfg.data_dir is None else cfg.out, 'fid_ref_cifar10_{mode}.npz')
        return dict(samples=n, **fid(images.split(500), self.extract, ref, lambda: self.images.split(500)))

# Settings that --resume may change (and every --lr*); it refuses a checkpoint trained with any other that differs.
RESUMABLE = ('resume', 'eval_only', 'kimg', 'eval_every', 'log_every', 'fid_samples', 'fid_final', 'data_dir', 'out',
             'compile', 'device', 'precision', 'sample_steps', 'batch_gpu', 'world_size')

def load_checkpoint(cfg, world, nets, opts, path):
    """--resume, --eval-only: restores nets, optimizers (with this run's learning rates), the RNG; returns the step."""
    ck = load_data(path)
    diff = ', '.join(f"--{k.replace('_', '-')} {v}" for k, v in ck['cfg'].items()
                     if k not in RESUMABLE and not k.startswith('lr') and vars(cfg).get(k) != v)
    if diff: raise SystemExit(f'error: --resume: {path} was trained with {diff}; pass the same, or another --out')
    if cfg.resume and len(ck['rng']) != cfg.world_size:
        raise SystemExit(f"error: --resume: {path} was trained on {len(ck['rng'])} GPUs (torchrun --nproc_per_node), "
                         f'not {cfg.world_size}; resume it on as many')
    for k, net in nets.items():
        net.load_state_dict(ck['nets'][k])
    for k, opt in opts.items():
        for saved, group in zip(ck['opts'][k]['param_groups'], opt.param_groups):
            saved['lr'] = group['lr']                                   # this run's learning rates
        opt.load_state_dict(ck['opts'][k])
    torch.set_rng_state(ck['rng'][world.rank])
    if world.device.type == 'cuda' and ck['cuda_rng'] is not None: torch.cuda.set_rng_state(ck['cuda_rng'][world.rank])
    if world.rank == 0: print(f"{'resumed from' if cfg.resume else 'evaluating'} {path} at step {ck['step']}")
    return ck['step']

def save_checkpoint(cfg, world, nets, opts, step, path):   # all --resume needs to go on bit-exactly; rank 0 writes
    bad = [k for k, m in nets.items() if not all(torch.isfinite(p).all() for p in m.parameters())]
    if bad: raise FloatingPointError(f'{bad[0]} has weights that are not finite at step {step}')   # keep the last good
    cuda = torch.cuda.get_rng_state() if world.device.type == 'cuda' else None
    states = [(torch.get_rng_state(), cuda)] * cfg.world_size         # every rank's RNG states
    if cfg.world_size > 1: torch.distributed.all_gather_object(states, states[0])
    if world.rank: return
    rng, cuda_rng = [s[0] for s in states], None if cuda is None else [s[1] for s in states]
    nets, opts = {k: m.state_dict() for k, m in nets.items()}, {k: o.state_dict() for k, o in opts.items()}
    atomic_save(dict(nets=nets, opts=opts, step=step, rng=rng, cuda_rng=cuda_rng, cfg=vars(cfg)), path)

def log_losses(cfg, world, step, names, pending, seconds):   # checks and prints the losses since the last log
    vals = torch.stack(pending)                                         # (steps, losses)
    if cfg.world_size > 1: torch.distributed.all_reduce(vals)          # summed over ranks: a NaN on one stops all
    vals = vals.cpu() / cfg.world_size                                  # the loop's one host sync
    if not torch.isfinite(vals).all():
        r, c = (~torch.isfinite(vals)).nonzero()[0].tolist()
        raise FloatingPointError(f'{names[c]} is {vals[r, c].item()} at step {step - len(vals) + r + 1}')
    dt, losses = seconds / len(vals), '  '.join(f'{k} {v:.4f}' for k, v in zip(names, vals.mean(0).tolist()))
    if world.rank == 0: tqdm.write(f'step {step:7d}  kimg {step * cfg.batch / 1000:9.2f}  {losses}  '
                                   f'{dt * 1000:.0f} ms/step  {cfg.batch / dt:.0f} img/s')

def fit(cfg, world, nets, opts, step_fn, sampler):
    """Trains to cfg.kimg: step_fn() -> {name: scalar loss}; nets, opts checkpointed; sampler(z, c) evaluated."""
    path = os.path.join(cfg.out, 'ckpt.pt')
    total = math.ceil(cfg.kimg * 1000 / cfg.batch)                      # training steps
    per_eval, step = max(round(cfg.eval_every * 1000 / cfg.batch), 1), 0
    try:
        if cfg.bench: return bench(cfg, world, step_fn)
        if os.path.exists(path) and not (cfg.resume or cfg.eval_only):
            raise SystemExit(f'error: {cfg.out} already holds a run; pass --resume to continue it, or another --out')
        if cfg.resume or cfg.eval_only: step = load_checkpoint(cfg, world, nets, opts, path)
        if cfg.eval_only: return world.evaluate(sampler, step, final=True)
        if step >= total: print(f'{cfg.out} is finished, at step {step} of {total}; a larger --kimg goes on')
        if world.rank == 0: os.makedirs(os.path.join(cfg.out, 'frames'), exist_ok=True)   # and the run folder
        if step == 0: world.evaluate(sampler, 0)                       # the generator as it starts: kimg 0
        signal.signal(signal.SIGTERM, signal.default_int_handler)      # pre-emption acts like Ctrl-C
        bar = tqdm(total=total, initial=step, unit='step', disable=world.rank > 0)
        pending, t0 = [], time.time()
        while step < total:
            with world.autocast():
                losses = step_fn()
            pending.append(torch.stack([v.detach().float() for v in losses.values()]))
            step += 1
            bar.update()
            due = step % per_eval == 0 or step == total
            snap = due or step % max(per_eval // 5, 1) == 0             # checkpoints five times per evaluation
            if snap or step % cfg.log_every == 0:                       # losses are checked before any checkpoint
                log_losses(cfg, world, step, list(losses), pending, time.time() - t0)
                pending, t0 = [], time.time()
            if due:
                world.evaluate(sampler, step, final=step == total)
                t0 = time.time()                                        # keep the evaluation out of ms/step
            if snap: save_checkpoint(cfg, world, nets, opts, step, path)
    except KeyboardInterrupt:
        raise SystemExit(f'interrupted at step {step}; continue from the last checkpoint {path} with --resume')
    except FloatingPointError as e:
        kept = path if os.path.exists(path) else f'{path} (none written yet)'
        raise SystemExit(f'error: {e}; stopped. The last good checkpoint is {kept}: --resume with a lower --lr '
                         'or --precision fp32')
    except torch.cuda.OutOfMemoryError:
        raise SystemExit(f'error: out of GPU memory at --batch-gpu {cfg.batch_gpu}; pass a smaller --batch-gpu '
                         '(the update stays the same, in more passes)')
    finally:
        if cfg.world_size > 1: torch.distributed.destroy_process_group()   # joins gloo's threads before Python exits
    bar.close()
    return dict(step=step, nets=nets)

PEAK_TFLOPS = {'H100': 989.0, 'H200': 989.0, 'A100': 312.0}            # dense bf16, per GPU: the MFU's denominator

def bench(cfg, world, step_fn):
    """Times cfg.bench training steps: ms/step, img/s, peak memory, and TFLOP/s and MFU from torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode
    cuda = world.device.type == 'cuda'
    with world.autocast():
        step_fn()                                                       # warm-up (and compilation)
        try:
            with FlopCounterMode(display=False) as counter:
                step_fn()
            flops = counter.get_total_flops()
        except RuntimeError:                                    # the counter fails on an inner backward (R1, reward)
            flops = float('nan')
            print("bench: torch's FLOP counter failed on this step; TFLOP/s and MFU are unknown")
        if cuda: torch.cuda.synchronize()
        if cuda: torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        for _ in range(cfg.bench):
            step_fn()
        if cuda: torch.cuda.synchronize()
    dt = (time.time() - t0) / cfg.bench
    name = torch.cuda.get_device_name() if cuda else 'cpu'
    precision = 'bf16' if world.bf16 else 'fp32' if cfg.precision == 'auto' or not cuda else cfg.precision
    mem = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), float('nan'))
    res = dict(script=cfg.script, device=name, batch=cfg.batch, batch_gpu=cfg.batch_gpu, precision=precision,
               compile=cfg.compile, ms_per_step=dt * 1000, img_per_s=cfg.batch / dt, peak_mem_gib=mem / 2 ** 30,
               gflop_per_img=flops / cfg.batch / 1e9, tflops=flops / dt / 1e12, mfu=flops / dt / 1e12 / peak)
    print('bench  ' + '  '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in res.items()))
    return res
# === END SHARED: run plumbing ===

if __name__ == '__main__':
    main()
