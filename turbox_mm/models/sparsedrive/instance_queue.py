"""SparseDrive's instance queue: a few frames of history for every tracked agent and for the ego
car, the temporal keys of the motion-planning head (docs/design/sparsedrive.md, section 6.2)."""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from turbox_mm.models.sparse4d.box3d import VY
from turbox_mm.models.sparse4d.instance_bank import project_anchors
from turbox_mm.registry import MODELS

#: The ego car's box state: at the origin, 0.5 m forward (+y, the heading), its bottom on the
#: ground (-1.84 m in the lidar frame), 4.08 x 1.73 x 1.56 m, zero velocity.
EGO_ANCHOR = (0.0, 0.5, -1.84 + 1.56 / 2, math.log(4.08), math.log(1.73), math.log(1.56),
              1.0, 0.0, 0.0, 0.0, 0.0)
#: Index of the ego's forward speed in the predicted ego status (velocity x, y, z at 6..8).
STATUS_FORWARD_SPEED = 6


def match_previous(instance_id: Tensor, prev_instance_id: Tensor,
                   prev_confidence: Optional[Tensor] = None,
                   threshold: float = 0.0) -> Tuple[Tensor, Tensor]:
    """For every query of this frame, the row of the previous frame with its instance id.

    Upstream builds the boolean match ``M[b, i, j] = id[b, i] == prev_id[b, j]`` (and
    ``prev_confidence[b, j] > threshold`` where ``threshold > 0``) and re-orders every queued
    tensor ``x`` as ``sum_j M[b, i, j] * x[b, j]``. Within a frame the bank's ids (>= 0) are
    unique, so a row of ``M`` holds at most one True and the sum is the row it points at, or 0.
    Here that row is found once, by an argmax over the match (``max`` over the match as
    uint8: ``argmax`` takes no bool input), with the row's any-flag; :func:`gather_rows` then
    applies it to each queued tensor. This equals upstream's sum exactly, with one
    ``[B, A]`` index in place of a ``[B, A, A, C]`` product per queued tensor.

    A negative id (-1: no id, only with a bank score threshold, which SparseDrive does not
    set) never matches here; upstream's product would sum over every -1 row of the previous
    frame.

    Args:
        instance_id (Tensor): ``[B, A]`` long ids of this frame's queries.
        prev_instance_id (Tensor): ``[B, A']`` ids of the previous frame's queries.
        prev_confidence (Tensor, optional): ``[B, A']`` their best class scores (sigmoid).
            Defaults to None.
        threshold (float): Previous queries need a confidence above this (when > 0).
            Defaults to 0.

    Returns:
        tuple: ``found`` ``[B, A]`` bool, ``source`` ``[B, A]`` long row index into the previous
        frame (meaningless where ``found`` is False).

    Examples:
        >>> found, src = match_previous(torch.tensor([[7, 3, 9]]), torch.tensor([[3, 9, 5]]))
        >>> found.tolist(), src[found].tolist()
        ([[False, True, True]], [0, 1])
    """
    valid = prev_instance_id >= 0
    if threshold > 0:
        if prev_confidence is None:
            raise ValueError('match_previous: a threshold needs prev_confidence')
        valid = valid & (prev_confidence > threshold)
    match = (instance_id[:, :, None] == prev_instance_id[:, None, :]) & valid[:, None, :]
    found, source = match.to(torch.uint8).max(dim=-1)
    return found.bool(), source


def gather_rows(x: Tensor, source: Tensor, found: Tensor) -> Tensor:
    """``x[b, source[b, i]]`` where ``found[b, i]``, else zeros.

    Args:
        x (Tensor): ``[B, A', ...]``.
        source (Tensor): ``[B, A]`` long.
        found (Tensor): ``[B, A]`` bool.

    Returns:
        Tensor: ``[B, A, ...]``, dtype of ``x``.
    """
    tail = x.shape[2:]
    index = source.reshape(*source.shape, *([1] * len(tail))).expand(*source.shape, *tail)
    rows = x.gather(1, index)
    keep = found.reshape(*found.shape, *([1] * len(tail)))
    return torch.where(keep, rows, torch.zeros_like(rows))


def ego_feature_map(feature_maps, feature_map_scale: Tuple[int, int]) -> Tensor:
    """The front camera's (camera 0) coarsest level, ``[B, C, h, w]``, from the head's inputs.

    Args:
        feature_maps: Either the deformable-aggregation triple ``(col_feats [B, N * sum(H_l *
            W_l), C], spatial_shape [N, L, 2], scale_start_index [N, L])`` or the list of
            levels ``[B, N, C, H_l, W_l]``.
        feature_map_scale (tuple[int, int]): ``(h, w)`` of the coarsest level.

    Returns:
        Tensor: ``[B, C, h, w]``.

    Raises:
        ValueError: The layout does not hold a last level of ``h x w`` per camera.

    The triple is read without touching ``spatial_shape``'s values (a host read on CUDA,
    which upstream's ``feature_maps_format(inverse=True)`` makes every step): camera-major
    columns make camera 0's last level the ``h * w`` columns that end its block of
    ``col_feats.shape[1] / N``; ``h, w`` come from the configured ``feature_map_scale``, as the
    encoder's pooling kernel does upstream.
    """
    h, w = feature_map_scale
    first = feature_maps[0]
    if first.dim() == 5:  # a list of levels
        last = feature_maps[-1]
        if tuple(last.shape[-2:]) != (h, w):
            raise ValueError(f'InstanceQueue: the last feature level is {tuple(last.shape[-2:])}'
                             f', feature_map_scale says {(h, w)}')
        return last[:, 0]
    if len(feature_maps) != 3 or first.dim() != 3:
        raise ValueError('InstanceQueue: feature_maps must be the deformable-aggregation triple '
                         '(col_feats [B, N * sum(HW), C], spatial_shape [N, L, 2], start '
                         '[N, L]) or a list of [B, N, C, H, W] levels')
    cams = feature_maps[1].shape[0]
    batch, cols, channels = first.shape
    if cols % cams or cols // cams < h * w:
        raise ValueError(f'InstanceQueue: col_feats has {cols} columns for {cams} cameras, '
                         f'which cannot end with an {h} x {w} level per camera')
    end = cols // cams
    return first[:, end - h * w:end].transpose(1, 2).reshape(batch, channels, h, w)


@MODELS.register_module()
class InstanceQueue(nn.Module):
    """History of the tracked agents and of the ego car over the last ``queue_length`` frames.

    Per frame (:meth:`get`, before the motion-planning decoder):

    1. A change of batch size (or of the number of det queries) forgets everything.
    2. Every queued box (agents and ego) is carried into the current frame with
       :func:`~turbox_mm.models.sparse4d.instance_bank.project_anchors`, no time shift
       (upstream's handler call passes no time), ``T_temp2cur = T_global_inv(now) @
       T_global(previous)`` computed on the device in float64 from the metas.
    3. Agents: each query takes over the queued features, boxes and period of the previous
       query with its instance id (and a previous confidence above ``tracking_threshold``),
       or zeros and period 0 (:func:`match_previous`, :func:`gather_rows`); the current det
       features and boxes join the queue (detached copies), ``period + 1``, at most
       ``queue_length`` entries and period.
    4. Ego: the ego feature comes from the front camera's coarsest level (:meth:`
       prepare_planning`); the ego anchor is :data:`EGO_ANCHOR` with ``vy`` set to the
       previous frame's predicted forward speed (zero where ``mask`` is False); the ego
       period restarts where ``mask`` (the det bank's "same scene" flag) is False.
    5. Key-padding mask ``[B, A + 1, L]``: entry ``k`` of ``L`` (oldest first) is masked when
       ``L - k`` exceeds the instance's period, so only its last ``period`` entries are seen;
       the current entry never is masked.

    After the decoder, :meth:`cache_motion` keeps the ids, confidences and the pose and
    :meth:`cache_planning` the predicted ego status; the ego queue's newest feature becomes
    the decoded ego feature (agents keep the det feature), as upstream.

    Differences from upstream (``P/models/motion/instance_queue.py`` @ ffebeb4), each
    deliberate: the re-ordering gathers instead of multiplying by the dense match (same
    values); ``T_temp2cur`` comes from the metas' device tensors (no numpy round trip); the
    ego feature map is cut out of the triple without reading ``spatial_shape`` (see
    :func:`ego_feature_map`); a ``mask`` of None while the queue holds history (upstream
    would fail) restarts every ego history, as the det bank then has no history either.

    Args:
        embed_dims (int): C. Defaults to 256.
        queue_length (int): L, frames kept (the current one included). Defaults to 4.
        tracking_threshold (float): Confidence a previous query needs to hand its history
            on; 0 for none. Defaults to 0.
        feature_map_scale (Sequence[float]): ``(h, w)`` of the coarsest feature level, e.g.
            ``(256 / 32, 704 / 32)``; the ego encoder pools over ``(h // 2, w // 2)``.

    Raises:
        ValueError: ``queue_length < 1`` or a missing / odd ``feature_map_scale``.
    """

    #: What ``turbox.compile.modules='auto'`` compiles of the queue: its steps of a frame
    #: (tensor work on every sample at once; each queue length up to ``queue_length`` is a
    #: variant of its own).
    turbox_compile_methods = ('get', 'cache_motion', 'cache_planning')
    # its caches outlive a step: not to be traced into a replayed CUDA graph (module_compiler)
    turbox_keeps_state = True

    def __init__(self,
                 embed_dims: int = 256,
                 queue_length: int = 4,
                 tracking_threshold: float = 0.0,
                 feature_map_scale: Optional[Sequence[float]] = None) -> None:
        super().__init__()
        if queue_length < 1:
            raise ValueError(f'InstanceQueue: queue_length must be >= 1, got {queue_length}')
        if feature_map_scale is None or len(feature_map_scale) != 2 or any(
                float(s) != int(s) or int(s) < 2 for s in feature_map_scale):
            raise ValueError('InstanceQueue: feature_map_scale must be the (h, w) of the '
                             f'coarsest feature level (integers >= 2), got {feature_map_scale}')
        self.embed_dims = embed_dims
        self.queue_length = queue_length
        self.tracking_threshold = tracking_threshold
        self.feature_map_scale = tuple(int(s) for s in feature_map_scale)
        kernel = tuple(s // 2 for s in self.feature_map_scale)
        self.ego_feature_encoder = nn.Sequential(
            nn.Conv2d(embed_dims, embed_dims, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(embed_dims),
            nn.Conv2d(embed_dims, embed_dims, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(embed_dims),
            nn.ReLU(),
            nn.AvgPool2d(kernel),
        )
        # A buffer under upstream's parameter name (frozen there), so checkpoints load.
        self.register_buffer('ego_anchor', torch.tensor([EGO_ANCHOR], dtype=torch.float32))
        self.reset()

    def reset(self) -> None:
        """Forget every history."""
        self.prev_T_global: Optional[Tensor] = None
        self.prev_instance_id: Optional[Tensor] = None
        self.prev_confidence: Optional[Tensor] = None
        self.period: Optional[Tensor] = None
        self.instance_feature_queue: List[Tensor] = []
        self.anchor_queue: List[Tensor] = []
        self.prev_ego_status: Optional[Tensor] = None
        self.ego_period: Optional[Tensor] = None
        self.ego_feature_queue: List[Tensor] = []
        self.ego_anchor_queue: List[Tensor] = []

    # -- before the decoder ---------------------------------------------------------------------

    def get(self, det_output: Dict, feature_maps, metas: Dict, batch_size: int,
            mask: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Update the queues with this frame and return the decoder's temporal inputs.

        Args:
            det_output (dict): The det head's output: ``instance_feature`` ``[B, A, C]``,
                ``prediction`` (list; the last ``[B, A, 11]``), ``instance_id`` ``[B, A]``.
            feature_maps: The image features (see :func:`ego_feature_map`).
            metas (dict): ``T_global`` and ``T_global_inv`` ``[B, 4, 4]``.
            batch_size (int): B.
            mask (Tensor, optional): ``[B]`` bool, the det bank's "previous frame is recent"
                flag; None on a first frame.

        Returns:
            tuple: ego feature ``[B, 1, C]`` (with gradient), ego anchor ``[B, 1, 11]``,
            queued features ``[B, A + 1, L, C]``, queued boxes ``[B, A + 1, L, 11]`` (in this
            frame), key-padding mask ``[B, A + 1, L]`` (True = not visible).
        """
        feature = det_output['instance_feature']
        if feature.dim() != 3 or feature.shape[0] != batch_size:
            raise ValueError(f"InstanceQueue: det_output['instance_feature'] must be "
                             f'[{batch_size}, A, C], got {list(feature.shape)}')
        if self.period is None or tuple(self.period.shape) != tuple(feature.shape[:2]):
            self.reset()
        else:
            self._project_queues(metas)
        self.prepare_motion(det_output, mask)
        ego_feature, ego_anchor = self.prepare_planning(feature_maps, mask, batch_size)

        temp_feature = torch.cat([torch.stack(self.instance_feature_queue, dim=2),
                                  torch.stack(self.ego_feature_queue, dim=2)], dim=1)
        temp_anchor = torch.cat([torch.stack(self.anchor_queue, dim=2),
                                 torch.stack(self.ego_anchor_queue, dim=2)], dim=1)
        period = torch.cat([self.period, self.ego_period], dim=1)
        count = torch.arange(len(self.anchor_queue), 0, -1, device=period.device)
        temp_mask = count[None, None] > period[..., None]
        return ego_feature, ego_anchor, temp_feature, temp_anchor, temp_mask

    def _project_queues(self, metas: Dict) -> None:
        """Carry every queued box into the current frame (one call for all entries)."""
        for key in ('T_global', 'T_global_inv'):
            if key not in metas:
                raise KeyError(f'InstanceQueue: metas lack {key!r} ([B, 4, 4])')
        T_temp2cur = metas['T_global_inv'].double() @ self.prev_T_global.double()
        queues = self.anchor_queue + self.ego_anchor_queue
        sizes = [q.shape[1] for q in queues]
        flat = torch.cat(queues, dim=1)
        moved = project_anchors(flat, T_temp2cur.to(flat.dtype), flat.new_zeros(flat.shape[0]))
        parts = list(torch.split(moved, sizes, dim=1))
        n = len(self.anchor_queue)
        self.anchor_queue, self.ego_anchor_queue = parts[:n], parts[n:]

    def prepare_motion(self, det_output: Dict, mask: Optional[Tensor] = None) -> None:
        """Re-order the agent queues by instance id and append this frame (step 3 above).

        ``mask`` is accepted for upstream's signature and unused: a new scene's queries get new
        ids from the det bank, so nothing of the previous scene matches.
        """
        feature = det_output['instance_feature']
        anchors = det_output['prediction'][-1]
        if self.period is None:
            self.period = feature.new_zeros(feature.shape[:2], dtype=torch.long)
        else:
            if 'instance_id' not in det_output:
                raise KeyError("InstanceQueue: det_output lacks 'instance_id' (set "
                               'with_instance_id=True on the det head)')
            found, source = match_previous(det_output['instance_id'], self.prev_instance_id,
                                           self.prev_confidence, self.tracking_threshold)
            self.instance_feature_queue = [gather_rows(x, source, found)
                                           for x in self.instance_feature_queue]
            self.anchor_queue = [gather_rows(x, source, found) for x in self.anchor_queue]
            self.period = gather_rows(self.period, source, found)
        # copies: the det head's outputs may live in a CUDA graph's pool (compile.mode=
        # 'reduce-overhead'), which the next step's replays overwrite
        self.instance_feature_queue.append(feature.detach().clone())
        self.anchor_queue.append(anchors.detach().clone())
        self.period = self.period + 1
        if len(self.instance_feature_queue) > self.queue_length:
            self.instance_feature_queue.pop(0)
            self.anchor_queue.pop(0)
        self.period = self.period.clamp(0, self.queue_length)

    def prepare_planning(self, feature_maps, mask: Optional[Tensor],
                         batch_size: int) -> Tuple[Tensor, Tensor]:
        """The ego feature and anchor of this frame; the ego queues take them (step 4).

        Returns:
            tuple: ego feature ``[B, 1, C]`` (not detached), ego anchor ``[B, 1, 11]``.
        """
        fmap = ego_feature_map(feature_maps, self.feature_map_scale)
        ego_feature = self.ego_feature_encoder(fmap).flatten(2).transpose(1, 2)
        if ego_feature.shape[1] != 1:
            raise ValueError(f'InstanceQueue: the ego encoder left {ego_feature.shape[1]} '
                             f'positions of the {tuple(fmap.shape[-2:])} map (expected 1); '
                             'check feature_map_scale')
        ego_anchor = self.ego_anchor[None].expand(batch_size, -1, -1)
        history = self.ego_period is not None
        if history:
            same = (mask.to(torch.bool) if mask is not None else
                    torch.zeros(batch_size, dtype=torch.bool, device=ego_feature.device))
            if same.shape != (batch_size, ):
                raise ValueError(f'InstanceQueue: mask must be [{batch_size}] bool, got '
                                 f'{list(same.shape)}')
        if self.prev_ego_status is not None and history:
            speed = self.prev_ego_status[..., STATUS_FORWARD_SPEED]
            speed = torch.where(same[:, None], speed, torch.zeros_like(speed))
            ego_anchor = ego_anchor.clone()
            ego_anchor[..., VY] = speed.to(ego_anchor.dtype)
        if not history:
            self.ego_period = torch.zeros(batch_size, 1, dtype=torch.long,
                                          device=ego_feature.device)
        else:
            self.ego_period = torch.where(same[:, None], self.ego_period,
                                          torch.zeros_like(self.ego_period))
        self.ego_feature_queue.append(ego_feature.detach().clone())
        self.ego_anchor_queue.append(ego_anchor.detach())
        self.ego_period = self.ego_period + 1
        if len(self.ego_feature_queue) > self.queue_length:
            self.ego_feature_queue.pop(0)
            self.ego_anchor_queue.pop(0)
        self.ego_period = self.ego_period.clamp(0, self.queue_length)
        return ego_feature, ego_anchor

    # -- after the decoder ----------------------------------------------------------------------

    def cache_motion(self, instance_feature: Tensor, det_output: Dict, metas: Dict) -> None:
        """Keep this frame's ids, confidences and pose for the next frame's matching.

        ``instance_feature`` (the decoded agents) is accepted for upstream's signature and
        unused: the agent queues keep the det features.
        """
        cls = det_output['classification'][-1]
        self.prev_confidence = cls.detach().sigmoid().max(dim=-1).values
        self.prev_instance_id = det_output['instance_id']
        self.prev_T_global = metas['T_global'].detach()

    def cache_planning(self, ego_feature: Tensor, ego_status: Tensor) -> None:
        """Keep the predicted ego status ``[B, 1, 10]``; the decoded ego feature ``[B, 1, C]``
        replaces the newest ego queue entry."""
        self.prev_ego_status = ego_status.detach().clone()  # copies, as in prepare_motion
        self.ego_feature_queue[-1] = ego_feature.detach().clone()
