"""One registration run in a Slicer scene: MRML volumes -> worker -> per-step results in the scene.

Live, each step updates in place: the output grid transform (the moving image, shown under it, warps in
every view at once: VTK resamples only the displayed slices), the chosen visualisation channel volume and
the convergence table/chart. At the end (completed, cancelled or failed after some steps): the warped
volume on the fixed grid, the Jacobian-determinant volume with a folding label map, one sequence per
per-step output synchronised by one sequence browser (the Sequences toolbar plays and scrubs the steps),
and a row in the comparison table.

The user's nodes are never modified: the moving image is shown through a separate display node
(``<moving> (warping)``) that shares its voxels. Every node a run creates carries the attributes
``IterativeRegistration.run`` and ``IterativeRegistration.role`` so re-runs can replace them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import slicer

from iterreg.geometry import Geometry
from iterreg.worker_client import RunRequest, StepMessage, WorkerClient

from .colors import JACOBIAN_RANGE, diverging_colors, jacobian_colors, show_signed
from .mrml_arrays import landmarks_ras, new_volume_like, set_grid_transform, set_volume_array, volume_array, \
    volume_geometry
from .plots import MetricsPlot

__all__ = ["RunSettings", "SceneRegistration", "COMPARISON_TABLE_NAME", "RUN_ATTRIBUTE", "ROLE_ATTRIBUTE"]

RUN_ATTRIBUTE = "IterativeRegistration.run"
ROLE_ATTRIBUTE = "IterativeRegistration.role"
PAIR_ATTRIBUTE = "IterativeRegistration.pair"
COMPARISON_TABLE_NAME = "IterativeRegistration comparison"
WARPED_PER_STEP_MAX_VOXELS = 100 ** 3  # above this, per-step 3D warps cost more than a step's latency budget
_COMPARISON_COLUMNS = ("run", "method", "state", "steps", "runtime_s", "similarity", "folding_percent",
                       "min_jacobian", "tre_before_mm", "tre_after_mm")


@dataclass
class RunSettings:
    method: str = "classical"
    steps: int | None = None
    checkpoint: str | None = None
    device: str = "auto"
    threads: int | None = None
    options: dict = field(default_factory=dict)
    channel: str | None = None  # which visualisation channel to show; None: the first the method yields
    channel_index: int = 0  # which map of it (the worker sends maps 0-3 unless told otherwise)
    channel_volumes: bool = True
    jacobian: bool = True
    mark_centres: bool = True  # a point per step where the method reports the centre of its local deformation
    keep_previous: bool = True  # False: remove earlier outputs of this method on this pair first
    warped_per_step: bool | None = None  # None: only when the fixed grid has <= 100^3 voxels
    use_landmarks_as_prompts: bool = False
    sequence_budget_mb: float = 1024.0  # per-step arrays kept for playback; long runs are thinned evenly


@dataclass
class _Recorded:
    index: int
    displacement: np.ndarray
    warped: np.ndarray | None
    channel: np.ndarray | None


class SceneRegistration:
    """Drive one run; ``poll()`` from a timer (see ``WorkerTimer``) or ``wait()`` headless."""

    def __init__(self, scene, fixed_node, moving_node, settings: RunSettings, fixed_landmarks=None,
                 moving_landmarks=None, command: list[str] | None = None,
                 on_step: Callable[["SceneRegistration", StepMessage], None] | None = None,
                 on_finished: Callable[["SceneRegistration"], None] | None = None,
                 refine: "SceneRegistration | None" = None):
        """``refine``: a finished run to continue from with the landmarks as prompts (a refinement); its
        outputs stay untouched, so undoing the refinement (:meth:`undo`) brings its transform back."""
        self.scene, self.fixed_node, self.moving_node, self.settings = scene, fixed_node, moving_node, settings
        self.parent = refine
        self.result_displacement: np.ndarray | None = None  # the final field, once the run finished
        self.fixed_landmarks, self.moving_landmarks = fixed_landmarks, moving_landmarks
        self.command, self.on_step_callback, self.on_finished_callback = command, on_step, on_finished
        self.client: WorkerClient | None = None
        self.geometry: Geometry | None = None
        self.nodes: dict[str, object] = {}
        self.plot: MetricsPlot | None = None
        self.records: list[_Recorded] = []
        self.record_stride = 1
        self.steps_done = 0
        self.steps_total = settings.steps
        self.started_at = 0.0
        self.summary: dict = {}
        self.message = ""
        self.channel_name: str | None = settings.channel
        self.run_id = ""
        self.warnings: list[str] = []

    # --- checks -----------------------------------------------------------------------------------------------
    @staticmethod
    def input_problem(fixed_node, moving_node, fixed_landmarks=None, moving_landmarks=None,
                      series: bool = False) -> str | None:
        """Why a run cannot start with these inputs (for the panel's disabled Run button), or None.
        ``series``: the moving volume is a 2D+t series registered to one of its own frames, so fixed may be it."""
        if fixed_node is None or moving_node is None:
            return "Select a fixed and a moving volume."
        if fixed_node is moving_node and not series:
            return "Fixed and moving volume are the same node; select two different volumes."
        for role, node in (("fixed", fixed_node), ("moving", moving_node)):
            if not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
                return f"The {role} volume must be a scalar (grey-value) volume, not a label map or vector volume."
            image = node.GetImageData()
            if image is None:
                return f"The {role} volume '{node.GetName()}' has no image data."
            if image.GetNumberOfScalarComponents() != 1:
                return f"The {role} volume '{node.GetName()}' has several components per voxel; use a scalar volume."
            dims = sorted(image.GetDimensions())
            if dims[1] < 4 or (dims[0] < 4 and dims[0] != 1):  # a single slice is fine (2D checkpoints)
                return (f"The {role} volume '{node.GetName()}' is too small ({image.GetDimensions()}); it needs at "
                        "least 4 voxels along each axis, or exactly one slice.")
            parent = node.GetParentTransformNode()
            if parent is not None and not parent.IsTransformToWorldLinear():
                return (f"The {role} volume is under the non-linear transform '{parent.GetName()}'; harden or "
                        "remove it first.")
        if (fixed_landmarks is None) != (moving_landmarks is None):
            return "Select both fixed and moving landmarks, or neither."
        if fixed_landmarks is not None:
            nf, nm = fixed_landmarks.GetNumberOfControlPoints(), moving_landmarks.GetNumberOfControlPoints()
            if nf != nm or nf == 0:
                return (f"Landmarks are paired by label (or else by order): {nf} fixed but {nm} moving points; "
                        "every fixed point needs one moving partner.")
        return None

    # --- life cycle -------------------------------------------------------------------------------------------
    def start(self) -> "SceneRegistration":
        problem = self.input_problem(self.fixed_node, self.moving_node, self.fixed_landmarks, self.moving_landmarks,
                                     series=self.settings.options.get("frame_axis", -1) >= 0)
        if problem:
            raise ValueError(problem)
        s = self.settings
        self.geometry = volume_geometry(self.fixed_node)
        moving_geometry = volume_geometry(self.moving_node)
        init = None
        if self.parent is not None:
            init = self._refinement_start()
            s.keep_previous, s.use_landmarks_as_prompts = True, True  # the run refined must stay, undo needs it
        pair_key = f"{self.fixed_node.GetID()}|{self.moving_node.GetID()}|{s.method}"
        if not s.keep_previous:
            self.remove_runs(self.scene, pair_key)
        self.run_id = f"{s.method}-{int(time.time() * 1000) % 10**9}"
        name = f"{self.moving_node.GetName()} to {self.fixed_node.GetName()} ({s.method})"
        if self.parent is not None:
            name = f"{self.parent.name} refined"
        self.name = _unique_name(self.scene, name)
        self._tag = {RUN_ATTRIBUTE: self.run_id, PAIR_ATTRIBUTE: pair_key}

        transform = self._new_node("vtkMRMLGridTransformNode", f"{self.name} transform", "transform")
        set_grid_transform(transform, np.zeros((3, *self.geometry.array_shape), np.float32), self.geometry)
        warping = self._new_node("vtkMRMLScalarVolumeNode", f"{self.moving_node.GetName()} (warping, {s.method})",
                                 "warping")
        warping.SetAndObserveImageData(self.moving_node.GetImageData())  # shares voxels: no copy, no change
        set_volume_geometry_only(warping, moving_geometry)
        warping.CreateDefaultDisplayNodes()
        _copy_window_level(self.moving_node, warping)
        warping.SetAndObserveTransformNodeID(transform.GetID())
        self.plot = MetricsPlot(self.scene, self.name, self._tag | {ROLE_ATTRIBUTE: "plot"})
        self.nodes["table"], self.nodes["chart"] = self.plot.table, self.plot.chart

        warped_per_step = s.warped_per_step
        if warped_per_step is None:
            warped_per_step = int(np.prod(self.geometry.array_shape)) <= WARPED_PER_STEP_MAX_VOXELS
        request = RunRequest(
            s.method, volume_array(self.fixed_node), self.geometry.to_dict(), volume_array(self.moving_node),
            moving_geometry.to_dict(), steps=s.steps, checkpoint=s.checkpoint, device=s.device, threads=s.threads,
            options=dict(s.options), arrays=("displacement", "warped") if warped_per_step else ("displacement",),
            channels=None if s.channel_volumes else {}, init_displacement=init)
        if s.use_landmarks_as_prompts and self.fixed_landmarks is not None:
            request.fixed_landmarks_ras, request.moving_landmarks_ras, request.landmark_labels = \
                self.paired_landmarks()
        self.client = WorkerClient(request, on_step=self._on_step, on_finished=self._on_finished,
                                   on_log=self._on_log, command=self.command, copy_arrays=False)
        self.started_at = time.monotonic()
        self.client.start()
        return self

    def _refinement_start(self) -> np.ndarray:
        """The field a refinement starts from: the parent run's result, on the same fixed grid."""
        parent = self.parent
        if parent.result_displacement is None:
            raise ValueError("The run to refine has no result yet; wait until it finished.")
        if parent.fixed_node is not self.fixed_node or parent.moving_node is not self.moving_node:
            raise ValueError("A refinement continues the last run on the same fixed and moving volumes.")
        if parent.geometry != self.geometry:
            raise ValueError("The fixed volume changed since the run to refine; run again instead of refining.")
        if self.fixed_landmarks is None:
            raise ValueError("Refining needs landmarks: place matching points in the fixed and moving lists.")
        return parent.result_displacement

    def paired_landmarks(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Fixed and moving points (RAS mm) paired by label when both lists have the same unique labels, else
        by order; with the pairs' names."""
        from iterreg.landmarks import pair_landmarks
        from iterreg.errors import InputError
        lists = []
        for node in (self.fixed_landmarks, self.moving_landmarks):
            labels = [node.GetNthControlPointLabel(i) or str(i + 1) for i in range(node.GetNumberOfControlPoints())]
            lists.append((landmarks_ras(node), labels))
        try:
            fixed, moving, labels = pair_landmarks(*lists)
        except InputError as exc:
            raise ValueError(str(exc)) from None
        return fixed, moving, list(labels)

    def undo(self) -> "SceneRegistration":
        """Undo a finished refinement: its nodes leave the scene and the run it refined, untouched all along,
        is the current result again. Returns that run."""
        if self.parent is None:
            raise ValueError("Only a refinement can be undone; this run started from scratch.")
        if self.running:
            raise ValueError("The refinement is still running; cancel it first.")
        self._remove_own_nodes()
        return self.parent

    def poll(self) -> bool:
        return self.client is not None and self.client.poll()

    def wait(self, timeout: float | None = None) -> str:
        return self.client.wait(timeout)

    def cancel(self) -> None:
        if self.client is not None:
            self.client.cancel()

    @property
    def running(self) -> bool:
        return self.client is not None and self.client.running

    @property
    def state(self) -> str:
        return "idle" if self.client is None else self.client.state

    def progress_text(self) -> str:
        """``step k/N`` with the time left estimated from the mean step time so far."""
        total = (self.client.info.get("steps") if self.client else None) or self.steps_total
        if not self.steps_done:
            return "starting the worker..." if self.running else ""
        elapsed = time.monotonic() - self.started_at
        text = f"step {self.steps_done}/{total}" if total else f"step {self.steps_done}"
        if total and self.running:
            left = elapsed / self.steps_done * (total - self.steps_done)
            text += f", about {left:.0f} s left" + (" (or less: the method stops when converged)" if left > 5 else "")
        return text

    def _on_log(self, level: str, text: str) -> None:
        """Warnings the user should see (e.g. channels shown at reduced resolution) are kept for the panel;
        every worker line also goes to Slicer's application log (Python logging), for troubleshooting."""
        import logging

        logging.getLogger("IterativeRegistration.worker").log(
            logging.WARNING if level == "warning" else logging.INFO, text)
        if level == "warning":
            self.warnings.append(text)

    # --- per step ---------------------------------------------------------------------------------------------
    def _on_step(self, step: StepMessage) -> None:
        self.steps_done += 1
        self.plot.add(step.index, step.metrics)
        if self.settings.mark_centres:
            self._mark_centre(step)
        if step.arrays is not None:
            displacement = step.displacement
            set_grid_transform(self.nodes["transform"], displacement, self.geometry)
            channel = self._show_channel(step.channels)
            self._record(step.index, displacement, step.warped, channel)
        if self.on_step_callback is not None:
            self.on_step_callback(self, step)

    def _mark_centre(self, step: StepMessage) -> None:
        """R2N2: the centre of this step's local Gaussian deformation, a point labelled with the step number."""
        keys = [f"center_{k}" for k in range(self.geometry.ndim)]
        if not all(k in step.metrics for k in keys):
            return
        node = self.nodes.get("centres")
        if node is None:
            node = self._new_node("vtkMRMLMarkupsFiducialNode", f"{self.name} centres", "centres")
            node.CreateDefaultDisplayNodes()
            node.SetLocked(True)  # results, not something to drag
            display = node.GetDisplayNode()
            display.SetGlyphScale(1.5)
            display.SetTextScale(2.0)
        ras = self.geometry.array_index_to_ras(np.array([[step.metrics[k] for k in keys]]))[0]
        node.AddControlPoint(*[float(c) for c in ras], str(step.index + 1))

    def _show_channel(self, channels: dict[str, np.ndarray]) -> np.ndarray | None:
        if not channels:
            return None
        if self.channel_name not in channels:
            self.channel_name = next(iter(channels))
        maps = channels[self.channel_name]
        self._put_channel_map(maps)
        return maps  # every map of the tensor is kept, so the map can be changed after the run

    def _map_index(self, maps: np.ndarray) -> int:
        return min(max(self.settings.channel_index, 0), maps.shape[0] - 1)

    def _put_channel_map(self, maps: np.ndarray) -> None:
        """Show the chosen map of ``maps`` ``[k, *spatial]`` in the channel volume."""
        index = self._map_index(maps)
        array = maps[index]
        geometry = self.geometry.scaled_to_shape(array.shape)
        node = self.nodes.get("channel")
        if node is None:
            node = self._new_node("vtkMRMLScalarVolumeNode", f"{self.name} channel", "channel")
            set_volume_array(node, array, geometry)
            node.CreateDefaultDisplayNodes()
            node.GetDisplayNode().SetAndObserveColorNodeID(diverging_colors(self.scene).GetID())
        else:
            set_volume_array(node, array, geometry)
        show_signed(node.GetDisplayNode(), array)
        node.SetAttribute("IterativeRegistration.channel", f"{self.channel_name}[{index}]")

    def select_channel_map(self, index: int) -> None:
        """Show another map of the channel tensor: live for the next steps, and after the run for every step
        of the playback sequence too."""
        self.settings.channel_index = int(index)
        sequence, browser = self.nodes.get("channel_volumes"), self.nodes.get("browser")
        with_maps = [r for r in self.records if r.channel is not None]
        if sequence is not None:
            scratch = slicer.vtkMRMLScalarVolumeNode()
            _copy_attributes(self.nodes["channel"], scratch)
            for record in with_maps:
                array = record.channel[self._map_index(record.channel)]
                set_volume_array(scratch, array, self.geometry.scaled_to_shape(array.shape))
                sequence.SetDataNodeAtValue(scratch, str(record.index))
        if with_maps:
            shown = with_maps[-1]
            if browser is not None:  # the map of the step the browser is on
                value = browser.GetMasterSequenceNode().GetNthIndexValue(browser.GetSelectedItemNumber())
                shown = next((r for r in with_maps if str(r.index) == value), shown)
            self._put_channel_map(shown.channel)

    def _record(self, index, displacement, warped, channel) -> None:
        """Keep copies for playback within the memory budget: when full, keep every other recorded step."""
        if index % self.record_stride:
            return
        self.records.append(_Recorded(index, np.array(displacement, np.float32),
                                      None if warped is None else np.array(warped, np.float32),
                                      None if channel is None else np.array(channel, np.float32)))
        budget = self.settings.sequence_budget_mb * 2**20
        while len(self.records) > 2 and sum(_nbytes(r) for r in self.records) > budget:
            self.record_stride *= 2
            self.records = [r for r in self.records if r.index % self.record_stride == 0]

    # --- end of run -------------------------------------------------------------------------------------------
    def _on_finished(self, client: WorkerClient) -> None:
        result = client.result
        if result is not None and result.arrays:
            displacement = result.arrays["displacement"]
            self.result_displacement = np.array(displacement, np.float32)
            set_grid_transform(self.nodes["transform"], displacement, self.geometry)
            if not self.records or self.records[-1].index != result.index:  # the last step always plays
                self.records.append(_Recorded(result.index, displacement, result.arrays.get("warped"), None))
            elif result.arrays.get("warped") is not None:  # the final warped volume is resampled once (ITK)
                last = self.records[-1]
                self.records[-1] = _Recorded(last.index, last.displacement, result.arrays["warped"], last.channel)
            self._final_outputs(result.arrays)
        if self.records:  # also after a crash: the steps received stay playable
            self._sequences()
        self.summary = self._summarise(client)
        if client.steps_received == 0:  # nothing to show: leave the scene as it was before Run
            self._remove_own_nodes()
        self._add_comparison_row()
        if client.state == "completed":
            self.message = f"Done: {client.steps_received} steps in {self.summary['runtime_s']:.1f} s."
        elif client.state == "cancelled":
            self.message = f"Cancelled after {client.steps_received} steps; the steps so far are kept."
        else:
            self.message = f"Failed: {client.failure}"
        if self.on_finished_callback is not None:
            self.on_finished_callback(self)

    def _final_outputs(self, arrays: dict[str, np.ndarray]) -> None:
        warped = self._new_volume(f"{self.name} warped", "warped", arrays["warped"], self.geometry)
        _copy_window_level(self.moving_node, warped)
        if self.settings.jacobian and "jacobian_determinant" in arrays:
            det = arrays["jacobian_determinant"].astype(np.float32)
            node = self._new_volume(f"{self.name} Jacobian determinant", "jacobian", det, self.geometry)
            display = node.GetDisplayNode()
            display.SetAndObserveColorNodeID(jacobian_colors(self.scene).GetID())
            display.SetAutoWindowLevel(False)
            display.SetWindowLevelMinMax(*JACOBIAN_RANGE)
            folding = (det <= 0).astype(np.uint8)
            self._new_volume(f"{self.name} folding", "folding", folding, self.geometry, labelmap=True)

    def _sequences(self) -> None:
        if not self.records:
            return
        browser = self._new_node("vtkMRMLSequenceBrowserNode", f"{self.name} steps", "browser")
        sequences = {"transform": self._new_node("vtkMRMLSequenceNode", f"{self.name} transforms", "transforms")}
        # Scrubbing copies an item's content onto the shown (proxy) node, attributes included: items carry the
        # proxy's attributes so the shown nodes stay recognisable as this run's outputs.
        scratch = slicer.vtkMRMLGridTransformNode()
        _copy_attributes(self.nodes["transform"], scratch)
        for record in self.records:
            set_grid_transform(scratch, record.displacement, self.geometry)
            sequences["transform"].SetDataNodeAtValue(scratch, str(record.index))
        for key, role in (("warped", "warped volumes"), ("channel", "channel volumes")):
            items = [r for r in self.records if getattr(r, key) is not None]
            if not items:
                continue
            sequences[key] = self._new_node("vtkMRMLSequenceNode", f"{self.name} {role}", role.replace(" ", "_"))
            for record in items:
                array = getattr(record, key)
                if key == "channel":
                    array = array[self._map_index(array)]
                scratch_volume = slicer.vtkMRMLScalarVolumeNode()
                if self.nodes.get(key) is not None:
                    _copy_attributes(self.nodes[key], scratch_volume)
                set_volume_array(scratch_volume, array, self.geometry.scaled_to_shape(array.shape))
                sequences[key].SetDataNodeAtValue(scratch_volume, str(record.index))
        for sequence in sequences.values():
            sequence.SetIndexName("step")
            sequence.SetIndexUnit("")
            sequence.SetIndexType(sequence.NumericIndex)
        # Proxies first, then the master sequence: otherwise the Sequences logic creates proxy nodes of its own.
        browser.AddProxyNode(self.nodes["transform"], sequences["transform"], False)
        for key in ("warped", "channel"):
            if key in sequences and self.nodes.get(key) is not None:
                browser.AddProxyNode(self.nodes[key], sequences[key], False)
        browser.SetAndObserveMasterSequenceNodeID(sequences["transform"].GetID())
        browser.SetPlaybackRateFps(10.0)
        browser.SetPlaybackItemSkippingEnabled(False)
        browser.SetPlaybackLooped(True)
        browser.SetSelectedItemNumber(browser.GetNumberOfItems() - 1)

    def _summarise(self, client: WorkerClient) -> dict:
        last = client.history[-1] if client.history else {}
        summary = {"run": self.name, "method": self.settings.method, "state": client.state,
                   "steps": client.steps_received, "runtime_s": time.monotonic() - self.started_at,
                   "similarity": last.get("similarity", float("nan")),
                   "folding_percent": last.get("folding_percent", float("nan")),
                   "min_jacobian": float("nan"), "tre_before_mm": float("nan"), "tre_after_mm": float("nan"),
                   "message": str(client.failure) if client.failure else ""}
        if client.result is not None and "jacobian_determinant" in (client.result.arrays or {}):
            summary["min_jacobian"] = float(client.result.arrays["jacobian_determinant"].min())
        if self.fixed_landmarks is not None and client.result is not None:
            try:
                fixed, moving, _ = self.paired_landmarks()
            except ValueError:
                fixed = moving = None
            if fixed is not None:
                # before: where the run started (identity, or the refined run's transform)
                summary["tre_before_mm"] = _mean_distance(self.parent.nodes.get("transform") if self.parent
                                                          else None, fixed, moving)
                summary["tre_after_mm"] = _mean_distance(self.nodes["transform"], fixed, moving)
        return summary

    def _add_comparison_row(self) -> None:
        table_node = comparison_table(self.scene)
        table = table_node.GetTable()
        row = table.InsertNextBlankRow()
        for c, key in enumerate(_COMPARISON_COLUMNS):
            value = self.summary.get(key)
            text = f"{value:.4g}" if isinstance(value, float) else str(value)
            table.SetValue(row, c, text)
        table.Modified()
        table_node.Modified()

    # --- node helpers -----------------------------------------------------------------------------------------
    def _new_node(self, class_name: str, name: str, role: str):
        node = self.scene.AddNewNodeByClass(class_name, name)
        for k, v in (self._tag | {ROLE_ATTRIBUTE: role}).items():
            node.SetAttribute(k, v)
        self.nodes[role] = node
        return node

    def _new_volume(self, name, role, array, geometry, labelmap=False):
        node = new_volume_like(self.scene, name, array, geometry, labelmap=labelmap)
        for k, v in (self._tag | {ROLE_ATTRIBUTE: role}).items():
            node.SetAttribute(k, v)
        self.nodes[role] = node
        return node

    def _remove_own_nodes(self) -> None:
        _remove_nodes(self.scene, [n for n in self.nodes.values() if n.GetScene() is self.scene]
                      + [s for s in (self.plot.series.values() if self.plot else [])])
        self.nodes = {}

    @staticmethod
    def remove_runs(scene, pair_key: str) -> int:
        """Remove every node of earlier runs with this fixed/moving/method key; returns how many."""
        doomed = []
        for i in range(scene.GetNumberOfNodes()):
            node = scene.GetNthNode(i)
            if node.GetAttribute(PAIR_ATTRIBUTE) == pair_key:
                doomed.append(node)
        _remove_nodes(scene, doomed)
        return len(doomed)


def _mean_distance(transform_node, fixed: np.ndarray, moving: np.ndarray) -> float:
    """Mean distance (mm) between fixed points mapped by a transform node (None: identity) and their partners."""
    mapped = fixed
    if transform_node is not None:
        transform = transform_node.GetTransformFromParent()
        mapped = np.array([transform.TransformPoint(p) for p in fixed])
    return float(np.linalg.norm(mapped - moving, axis=1).mean())


def _remove_nodes(scene, nodes) -> None:
    """Remove nodes with their display nodes; sequence browsers first, or the Sequences logic would recreate
    the proxy nodes of their sequences as soon as those disappear."""
    nodes = sorted(nodes, key=lambda n: not n.IsA("vtkMRMLSequenceBrowserNode"))
    for node in nodes:
        if node.GetScene() is not scene:
            continue
        if node.IsA("vtkMRMLDisplayableNode"):
            for d in range(node.GetNumberOfDisplayNodes()):
                if node.GetNthDisplayNode(d) is not None:
                    scene.RemoveNode(node.GetNthDisplayNode(d))
        scene.RemoveNode(node)


def comparison_table(scene):
    """The table with one row per run (created on first use)."""
    node = scene.GetFirstNodeByName(COMPARISON_TABLE_NAME)
    if node is None or not node.IsA("vtkMRMLTableNode"):
        import vtk
        node = scene.AddNewNodeByClass("vtkMRMLTableNode", COMPARISON_TABLE_NAME)
        for key in _COMPARISON_COLUMNS:
            column = vtk.vtkStringArray()
            column.SetName(key)
            node.GetTable().AddColumn(column)
    return node


def set_volume_geometry_only(node, geometry: Geometry) -> None:
    from .mrml_arrays import numpy_to_matrix
    node.SetIJKToRASMatrix(numpy_to_matrix(geometry.ijk_to_ras_matrix()))


def _copy_attributes(source, target) -> None:
    for name in source.GetAttributeNames():
        target.SetAttribute(name, source.GetAttribute(name))


def _copy_window_level(source, target) -> None:
    src, dst = source.GetDisplayNode(), target.GetDisplayNode()
    if src is not None and dst is not None:
        dst.SetAutoWindowLevel(src.GetAutoWindowLevel())
        if not src.GetAutoWindowLevel():
            dst.SetWindowLevel(src.GetWindow(), src.GetLevel())


def _nbytes(record: _Recorded) -> int:
    return sum(a.nbytes for a in (record.displacement, record.warped, record.channel) if a is not None)


def _unique_name(scene, name: str) -> str:
    if scene.GetFirstNodeByName(f"{name} transform") is None:
        return name
    k = 2
    while scene.GetFirstNodeByName(f"{name} {k} transform") is not None:
        k += 1
    return f"{name} {k}"
