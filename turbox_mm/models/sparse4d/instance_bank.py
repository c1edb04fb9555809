"""Sparse4D's instance bank: learned anchors plus the instances carried over from past frames."""
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from turbox_mm.registry import MODELS
from ..layers.lss import rotate_points
from .box3d import COS_YAW, SIN_YAW, VX, VZ, X, Z


def project_anchors(anchor: Tensor, transform: Tensor, time_interval: Tensor,
                    upstream_yaw_order: bool = False) -> Tensor:
    """Carry box states ``[B, N, 11]`` from a past frame into the current one.

    Each centre first moves by its velocity over ``time_interval`` (seconds from the past
    frame to now), then the rigid ``transform`` (``[B, 4, 4]``, past frame to current frame)
    rotates and moves centres and rotates the yaw and the velocity; sizes are unchanged. The
    rotations run as float32 multiply-adds, never in TF32 (which would move a centre 50 m away
    by centimetres a frame).

    Args:
        anchor (Tensor): ``[B, N, 11]``.
        transform (Tensor): ``[B, 4, 4]``.
        time_interval (Tensor): ``[B]``.
        upstream_yaw_order (bool): Upstream writes the rotated ``(cos, sin)`` into the
            ``(sin, cos)`` slots (docs/design/sparse4d.md, 0.3-1); True reproduces that, to
            match checkpoints trained with it. Defaults to False (the correct order).

    Returns:
        Tensor: ``[B, N, 11]``.
    """
    rot, trans = transform[:, None, :3, :3], transform[:, None, :3, 3]
    centre = anchor[..., X:Z + 1] + anchor[..., VX:VZ + 1] * time_interval[:, None, None]
    out = anchor.clone()
    out[..., X:Z + 1] = rotate_points(rot, centre, elementwise=True) + trans
    cos_sin = torch.stack([anchor[..., COS_YAW], anchor[..., SIN_YAW]], dim=-1)
    cos_new, sin_new = rotate_points(rot[..., :2, :2], cos_sin, elementwise=True).unbind(-1)
    if upstream_yaw_order:
        out[..., SIN_YAW], out[..., COS_YAW] = cos_new, sin_new
    else:
        out[..., SIN_YAW], out[..., COS_YAW] = sin_new, cos_new
    out[..., VX:VZ + 1] = rotate_points(rot, anchor[..., VX:VZ + 1], elementwise=True)
    return out


@MODELS.register_module()
class InstanceBank(nn.Module):
    """Learned anchors and features, plus the best instances of the previous frame.

    Per sample and frame: :meth:`get` returns the learned anchors/features and, where a cache
    exists, the cached instances projected into the current frame; :meth:`update` (after the
    first, single-frame decoder layer) replaces the weakest current instances by the cached
    ones where the cache is recent (``|dt| <= max_time_interval``); :meth:`cache` (after the
    last layer) keeps the ``num_temp_instances`` most confident instances, with the confidence
    of carried instances decaying by ``confidence_decay`` a frame.

    As upstream, cached instances are returned by :meth:`get` even when they are too old for
    :meth:`update` (the temporal attention still sees them); a change of batch size resets the
    cache. :meth:`project_to_current` moves other past-frame states (the temporal denoising
    anchors) by the same motion.

    Other anchor kinds (SparseDrive's map instances, ``[M, 20, 2]`` point sets flattened to
    ``[M, 40]``) come with an ``anchor_handler``: a module whose ``anchor_projection(anchor,
    transform, time_interval)`` carries them from the past frame into the current one. Without
    a handler, anchors are Sparse4D's 11-d box states and :func:`project_anchors` moves them.
    ``num_temp_instances=0`` keeps no cache at all (SparseDrive's stage-1 map bank): every
    frame starts afresh and the temporal attention sees no past instances.

    Tracking (test time): :meth:`get_instance_id`, after :meth:`cache`, gives every query of
    the frame an instance id. The queries that continue a cached instance keep its id; every
    other query (above ``threshold``, where one is given) takes a fresh id; the ids of the
    cached instances travel with them to the next frame. Where :meth:`update` finds a stale
    cache (``|dt| > max_time_interval``: a new scene in that batch slot) the slot's ids are
    dropped with it, so that a new scene starts with new ids, per sample of the batch. Fresh ids
    are numbered in (sample, query) order from one counter; unlike upstream, which restarts
    it at 0 on a reset, the counter runs on over the bank's life (ids stay unique even where a
    batch-size change resets the bank within a scene). The numbering stays on the device:
    no host reads.

    Args:
        num_anchor (int): Learned anchors. Defaults to 900.
        embed_dims (int): Feature size. Defaults to 256.
        anchor (str | np.ndarray | Sequence): ``[>= num_anchor, 11]`` initial anchors or the
            path of a ``.npy`` file with them (``tools/sparse4d_anchors.py``); with an
            ``anchor_handler``, ``[>= num_anchor, D]`` or ``[>= num_anchor, P, d]`` (flattened
            to ``[num_anchor, P * d]``).
        num_temp_instances (int): Instances carried to the next frame, 0 for none. Defaults
            to 600.
        confidence_decay (float): Decay of carried confidences a frame. Defaults to 0.6.
        max_time_interval (float): Older caches do not update. Defaults to 2.0 s.
        default_time_interval (float): ``dt`` used without a (recent) cache. Defaults to 0.5.
        anchor_grad (bool): Learn the anchors. Defaults to True.
        feat_grad (bool): Learn the initial features (else zeros). Defaults to False.
        upstream_yaw_order (bool): See :func:`project_anchors`. Defaults to False.
        anchor_handler (dict, optional): Config (``MODELS``) of a module with
            ``anchor_projection``; it then projects the cached anchors instead of
            :func:`project_anchors`. Defaults to None.
        reset_stale_confidence (bool): In :meth:`update`, zero the carried confidence of
            samples whose cache is stale (``|dt| > max_time_interval``) before it decays into
            the next cache, as SparseDrive's bank does (Sparse4D v3's does not). Defaults to
            False.
    """

    #: What ``turbox.compile.modules='auto'`` compiles of the bank: each step of its frame
    #: (tensor work on every sample at once; the cache's state becomes guards, so the first
    #: frame, without a cache, and the later ones are separate graphs).
    turbox_compile_methods = ('get', 'update', 'cache', 'get_instance_id')
    # its caches outlive a step: not to be traced into a replayed CUDA graph (module_compiler)
    turbox_keeps_state = True

    def __init__(self,
                 num_anchor: int = 900,
                 embed_dims: int = 256,
                 anchor: Union[str, np.ndarray, Sequence] = None,
                 num_temp_instances: int = 600,
                 confidence_decay: float = 0.6,
                 max_time_interval: float = 2.0,
                 default_time_interval: float = 0.5,
                 anchor_grad: bool = True,
                 feat_grad: bool = False,
                 upstream_yaw_order: bool = False,
                 anchor_handler: Optional[dict] = None,
                 reset_stale_confidence: bool = False) -> None:
        super().__init__()
        if anchor is None:
            raise ValueError('InstanceBank: anchor (an array or an .npy file) is required')
        source = anchor if isinstance(anchor, str) else 'the anchor array'
        if isinstance(anchor, str):
            anchor = np.load(anchor)
        anchor = np.asarray(anchor, dtype=np.float32)
        self.anchor_handler = None
        if anchor_handler is not None:
            self.anchor_handler = MODELS.build(anchor_handler)
            if not callable(getattr(self.anchor_handler, 'anchor_projection', None)):
                raise TypeError(f'InstanceBank: anchor_handler {type(self.anchor_handler).__name__}'
                                ' has no anchor_projection(anchor, transform, time_interval)')
            if upstream_yaw_order:
                raise ValueError('InstanceBank: upstream_yaw_order applies to the built-in box '
                                 'projection only, not with an anchor_handler')
            if anchor.ndim == 3:
                anchor = anchor.reshape(len(anchor), -1)
            if anchor.ndim != 2 or len(anchor) < num_anchor:
                raise ValueError(f'InstanceBank: anchors must be [>= {num_anchor}, D] or '
                                 f'[>= {num_anchor}, P, d], got {anchor.shape} from {source}')
        elif anchor.ndim != 2 or anchor.shape[1] != 11 or len(anchor) < num_anchor:
            raise ValueError(f'InstanceBank: anchors must be [>= {num_anchor}, 11], got '
                             f'{anchor.shape} from {source} (other anchor kinds need an '
                             'anchor_handler)')
        if not 0 <= num_temp_instances <= num_anchor:
            raise ValueError(f'InstanceBank: num_temp_instances must be in [0, {num_anchor}], '
                             f'got {num_temp_instances}')
        self.reset_stale_confidence = reset_stale_confidence
        self.num_anchor, self.embed_dims = num_anchor, embed_dims
        self.num_temp_instances = num_temp_instances
        self.confidence_decay = confidence_decay
        self.max_time_interval = max_time_interval
        self.default_time_interval = default_time_interval
        self.upstream_yaw_order = upstream_yaw_order
        self._init_anchor = torch.from_numpy(anchor[:num_anchor].copy())
        self.anchor = nn.Parameter(self._init_anchor.clone(), requires_grad=anchor_grad)
        self.instance_feature = nn.Parameter(torch.zeros(num_anchor, embed_dims),
                                             requires_grad=feat_grad)
        self.init_weights()
        self.reset()
        # The next fresh instance id (a 0-d long tensor on the queries' device once used); not
        # a buffer, so neither checkpoints nor EMA models see it.
        self._next_id: Optional[Tensor] = None

    def init_weights(self) -> None:
        """Anchors back to the given values; features xavier-initialised when learned."""
        with torch.no_grad():
            self.anchor.copy_(self._init_anchor)
        if self.instance_feature.requires_grad:
            nn.init.xavier_uniform_(self.instance_feature)

    def reset(self) -> None:
        """Forget the cache (a new sequence for every sample)."""
        self.cached_feature: Optional[Tensor] = None
        self.cached_anchor: Optional[Tensor] = None
        self.confidence: Optional[Tensor] = None
        self.mask: Optional[Tensor] = None
        self.prev_timestamp: Optional[Tensor] = None
        self.prev_T_global: Optional[Tensor] = None
        self._temp2cur: Optional[Tensor] = None
        self._dt: Optional[Tensor] = None
        # Tracking: ids of the cached instances [B, num_temp_instances] (-1: none), the rows of
        # the last cache() [B, num_temp_instances], the carried ids of this frame's queries
        # after update() [B, num_anchor].
        self.instance_id: Optional[Tensor] = None
        self._cache_index: Optional[Tensor] = None
        self._frame_id: Optional[Tensor] = None

    def get(self, batch_size: int, timestamp: Tensor, T_global: Tensor,
            T_global_inv: Tensor) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor],
                                           Tensor]:
        """The instances of the current frame.

        Args:
            batch_size (int): Samples.
            timestamp (Tensor): ``[B]`` seconds (float64 recommended: ~1.5e9 s).
            T_global (Tensor): ``[B, 4, 4]`` current lidar frame to global.
            T_global_inv (Tensor): ``[B, 4, 4]`` global to current lidar frame.

        Returns:
            tuple: learned features ``[B, num_anchor, C]``, learned anchors
            ``[B, num_anchor, 11]``, cached features ``[B, T, C]`` or None, cached anchors
            projected into this frame ``[B, T, 11]`` or None, time intervals ``[B]``.
        """
        feature = self.instance_feature[None].expand(batch_size, -1, -1)
        anchor = self.anchor[None].expand(batch_size, -1, -1)
        self._frame_id = None
        dtype = feature.dtype
        interval = feature.new_full((batch_size, ), self.default_time_interval)
        if self.cached_anchor is None or self.cached_anchor.shape[0] != batch_size:
            self.reset()
            return feature, anchor, None, None, interval
        dt = (timestamp.double() - self.prev_timestamp.double())
        self.mask = dt.abs() <= self.max_time_interval
        temp2cur = (T_global_inv.double() @ self.prev_T_global.double()).to(dtype)
        self._temp2cur, self._dt = temp2cur, dt.to(dtype)
        self.cached_anchor = self.project_to_current(self.cached_anchor)
        use = self.mask & (dt != 0)
        interval = torch.where(use, dt.to(dtype), interval)
        return feature, anchor, self.cached_feature, self.cached_anchor, interval

    def project_to_current(self, anchor: Tensor) -> Tensor:
        """Box states ``[B, N, 11]`` of the previous frame in the current one, by the motion
        that the last :meth:`get` found (e.g. the temporal denoising anchors of the sampler).

        Raises:
            RuntimeError: :meth:`get` found no cache to project from.
        """
        if self._temp2cur is None:
            raise RuntimeError('InstanceBank.project_to_current: no previous frame; call get() '
                               'after a cache() first')
        if self.anchor_handler is not None:
            return self.anchor_handler.anchor_projection(anchor, self._temp2cur, self._dt)
        return project_anchors(anchor, self._temp2cur, self._dt, self.upstream_yaw_order)

    def update(self, feature: Tensor, anchor: Tensor, cls: Tensor) -> Tuple[Tensor, Tensor]:
        """After the single-frame layer: the weakest current instances make room for the cache.

        Args:
            feature (Tensor): ``[B, Q, C]`` (``Q >= num_anchor``; extra rows, e.g. denoising
                queries, are kept as they are at the end).
            anchor (Tensor): ``[B, Q, 11]``.
            cls (Tensor): ``[B, Q, num_classes]`` logits.

        Returns:
            tuple: features and anchors ``[B, Q, ...]``.
        """
        if self.cached_feature is None:
            return feature, anchor
        n = self.num_anchor
        extra_f, extra_a = feature[:, n:], anchor[:, n:]
        feature, anchor, cls = feature[:, :n], anchor[:, :n], cls[:, :n]
        keep = n - self.num_temp_instances
        idx = cls.max(dim=-1).values.topk(keep, dim=1).indices
        top_f = feature.gather(1, idx[..., None].expand(-1, -1, feature.shape[-1]))
        top_a = anchor.gather(1, idx[..., None].expand(-1, -1, anchor.shape[-1]))
        merged_f = torch.cat([self.cached_feature, top_f], dim=1)
        merged_a = torch.cat([self.cached_anchor, top_a], dim=1)
        mask = self.mask[:, None, None]
        feature = torch.where(mask, merged_f, feature)
        anchor = torch.where(mask, merged_a, anchor)
        if self.reset_stale_confidence and self.confidence is not None:
            self.confidence = torch.where(self.mask[:, None], self.confidence,
                                          torch.zeros_like(self.confidence))
        if self.instance_id is not None:
            # The cached instances now lead the queries; a stale slot keeps none of them.
            carried = torch.cat([self.instance_id, self.instance_id.new_full((
                self.instance_id.shape[0], keep), -1)], dim=1)
            self._frame_id = torch.where(self.mask[:, None], carried, -1)
        return torch.cat([feature, extra_f], dim=1), torch.cat([anchor, extra_a], dim=1)

    def cache(self, feature: Tensor, anchor: Tensor, cls: Tensor, timestamp: Tensor,
              T_global: Tensor) -> None:
        """After the last layer: keep the most confident instances for the next frame.

        Args:
            feature (Tensor): ``[B, Q, C]`` (only the first ``num_anchor`` rows are cached).
            anchor (Tensor): ``[B, Q, 11]``.
            cls (Tensor): ``[B, Q, num_classes]`` logits.
            timestamp (Tensor): ``[B]`` seconds.
            T_global (Tensor): ``[B, 4, 4]`` this frame to global.
        """
        n, t = self.num_anchor, self.num_temp_instances
        if t == 0:
            return  # nothing is carried: the next get() starts afresh
        feature, anchor = feature[:, :n].detach(), anchor[:, :n].detach()
        confidence = cls[:, :n].detach().max(dim=-1).values.sigmoid()
        if self.confidence is not None and self.confidence.shape[0] == confidence.shape[0]:
            decayed = torch.maximum(self.confidence * self.confidence_decay, confidence[:, :t])
            confidence = torch.cat([decayed, confidence[:, t:]], dim=1)
        self.confidence, idx = confidence.topk(t, dim=1)
        # The ids of these instances, if any, come from get_instance_id() after this call.
        self._cache_index, self.instance_id = idx, None
        self.cached_feature = feature.gather(1, idx[..., None].expand(-1, -1, feature.shape[-1]))
        self.cached_anchor = anchor.gather(1, idx[..., None].expand(-1, -1, anchor.shape[-1]))
        self.prev_timestamp = timestamp.detach().clone()
        self.prev_T_global = T_global.detach().clone()

    def get_instance_id(self, cls: Tensor, threshold: Optional[float] = None) -> Tensor:
        """Instance ids of this frame's queries (tracking; call after :meth:`cache`).

        A query that continues a cached instance (the leading rows after :meth:`update`) keeps
        its id; every other query whose best class score (sigmoid) reaches ``threshold`` gets
        a fresh id, and the rest get -1. The ids of the instances just cached are kept for
        the next frame.

        Args:
            cls (Tensor): ``[B, Q, num_classes]`` logits of the last layer (the rows that
                :meth:`cache` saw; rows past ``num_anchor`` are ignored).
            threshold (float, optional): Fresh ids only from this score on. Defaults to None
                (every query), what upstream's v3 config does (it passes its decoder's
                ``score_threshold``, None).

        Returns:
            Tensor: ``[B, num_anchor]`` long ids, -1 where none.

        Raises:
            RuntimeError: :meth:`cache` was not called for this frame.
        """
        if self._cache_index is None or self._cache_index.shape[0] != cls.shape[0]:
            raise RuntimeError('InstanceBank.get_instance_id: no cache for this frame; call '
                               'cache() first')
        confidence = cls[:, :self.num_anchor].detach().max(dim=-1).values.sigmoid()
        if self._frame_id is not None:
            ids = self._frame_id
        else:
            ids = torch.full(confidence.shape, -1, dtype=torch.long, device=confidence.device)
        fresh = ids < 0
        if threshold is not None:
            fresh = fresh & (confidence >= threshold)
        if self._next_id is None:
            self._next_id = torch.zeros((), dtype=torch.long, device=ids.device)
        start = self._next_id.to(ids.device)
        # Fresh ids in (sample, query) order: the running count of fresh queries before each.
        rank = fresh.flatten().long().cumsum(0).view_as(fresh) - 1
        ids = torch.where(fresh, start + rank, ids)
        self._next_id = start + fresh.sum()
        self.instance_id = ids.gather(1, self._cache_index)
        self._frame_id = None
        return ids
