"""Stand-ins for the Slicer/CTK widgets our .ui uses, for the PySide6 test harness only.

Each keeps the API the module uses (PythonQt style): ``qMRMLNodeComboBox`` lists scene nodes of its
``nodeTypes`` and emits ``currentNodeChanged(node)``; ``ctkCollapsibleButton`` is a titled container with
``text`` and ``collapsed``; ``qMRMLWidget`` is a plain container with ``setMRMLScene``.
The flat ``qt`` shim turns Qt properties into attributes (as PythonQt does), which hides same-named getters
such as ``count()``; the stand-ins therefore read those through ``property(name)``.
"""
from __future__ import annotations

from PySide6 import QtCore, QtWidgets


class qMRMLWidget(QtWidgets.QWidget):  # noqa: N801 - Slicer's class name
    mrmlSceneChanged = QtCore.Signal(object)

    def setMRMLScene(self, scene) -> None:
        self._scene = scene
        self.mrmlSceneChanged.emit(scene)


class ctkCollapsibleButton(QtWidgets.QGroupBox):  # noqa: N801
    def __init__(self, parent=None):
        super().__init__(parent)
        self._collapsed = False

    def _get_text(self) -> str:
        return self.property("title")

    def _set_text(self, text: str) -> None:
        self.setTitle(text)

    def _get_collapsed(self) -> bool:
        return self._collapsed

    def _set_collapsed(self, value: bool) -> None:
        self._collapsed = bool(value)

    text = QtCore.Property(str, _get_text, _set_text)
    collapsed = QtCore.Property(bool, _get_collapsed, _set_collapsed)


class qMRMLNodeComboBox(QtWidgets.QComboBox):  # noqa: N801
    currentNodeChanged = QtCore.Signal(object)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._scene = None
        self._types: list[str] = []
        self._none = False
        self._flags = {}
        self._observers = []
        self.currentIndexChanged.connect(lambda _i: self.currentNodeChanged.emit(self.currentNode()))

    # properties the .ui sets
    def _get_types(self):
        return list(self._types)

    def _set_types(self, types):
        self._types = list(types)
        self._refresh()

    def _get_none(self):
        return self._none

    def _set_none(self, value):
        self._none = bool(value)
        self._refresh()

    nodeTypes = QtCore.Property("QStringList", _get_types, _set_types)
    noneEnabled = QtCore.Property(bool, _get_none, _set_none)
    for _flag in ("addEnabled", "removeEnabled", "renameEnabled", "showChildNodeTypes", "selectNodeUponCreation"):
        locals()[_flag] = QtCore.Property(bool, lambda self, f=_flag: self._flags.get(f, False),
                                          lambda self, v, f=_flag: self._flags.__setitem__(f, bool(v)))

    # the API the module uses
    def setMRMLScene(self, scene) -> None:
        for tag in self._observers:
            self._scene.RemoveObserver(tag)
        self._scene = scene
        self._observers = [scene.AddObserver(event, lambda *a: self._refresh())
                           for event in (scene.NodeAddedEvent, scene.NodeRemovedEvent)]
        self._refresh()

    def mrmlScene(self):
        return self._scene

    def _nodes(self) -> list:
        if self._scene is None:
            return []
        nodes = []
        for class_name in self._types:
            for i in range(self._scene.GetNumberOfNodesByClass(class_name)):
                node = self._scene.GetNthNodeByClass(i, class_name)
                # showChildNodeTypes=False: a label map is a scalar volume subclass but not offered
                if not self._flags.get("showChildNodeTypes", True) and node.GetClassName() != class_name:
                    continue
                if node.GetHideFromEditors() or node in nodes:
                    continue
                nodes.append(node)
        return nodes

    def _refresh(self) -> None:
        current = self.currentNode()
        self.blockSignals(True)
        self.clear()
        if self._none:
            self.addItem("None", None)
        for node in self._nodes():
            self.addItem(node.GetName(), node.GetID())
        index = self.findData(current.GetID()) if current is not None else -1
        if index < 0:
            index = 0 if self.property("count") else -1
        self.setCurrentIndex(index)
        self.blockSignals(False)
        if self.currentNode() is not current:
            self.currentNodeChanged.emit(self.currentNode())

    def currentNode(self):
        index = self.property("currentIndex")
        node_id = self.itemData(index) if index >= 0 else None
        return None if node_id is None or self._scene is None else self._scene.GetNodeByID(node_id)

    def setCurrentNode(self, node) -> None:
        self.setCurrentIndex(self.findData(node.GetID()) if node is not None else (0 if self._none else -1))

    def currentNodeID(self):
        node = self.currentNode()
        return None if node is None else node.GetID()


class qSlicerMarkupsPlaceWidget(QtWidgets.QPushButton):  # noqa: N801
    """Slicer's place button: ``setMRMLScene``, ``setCurrentNode``, ``currentNode`` and ``placeModeEnabled``.
    Without views to click in, tests add control points to the node directly."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self._scene = self._node = None
        self._place = False
        self.setCheckable(True)

    def setMRMLScene(self, scene) -> None:
        self._scene = scene

    def setCurrentNode(self, node) -> None:
        self._node = node

    def currentNode(self):
        return self._node

    def _get_place(self) -> bool:
        return self._place

    def _set_place(self, value: bool) -> None:
        self._place = bool(value) and self._node is not None

    placeModeEnabled = QtCore.Property(bool, _get_place, _set_place)


CUSTOM_WIDGETS = (qMRMLWidget, ctkCollapsibleButton, qMRMLNodeComboBox, qSlicerMarkupsPlaceWidget)
