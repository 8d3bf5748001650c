"""A flat ``qt`` module for tests, standing in for Slicer's PythonQt ``qt`` on PySide6 (DESIGN.md §6).

PythonQt exposes every Qt class in one module and every Qt *property* as a Python attribute
(``button.enabled = False``, ``spin.value``). PySide6's own ``true_property`` feature is broken with
pytest-qt, so each QObject class here gets one descriptor per meta-property instead:
get -> ``property(name)``, set -> ``setProperty(name, value)``. Test harness only; never shipped.
"""
from PySide6 import QtCore, QtGui, QtUiTools, QtWidgets


class _QtProperty:
    def __init__(self, name: str):
        self.name = name

    def __get__(self, obj, owner=None):
        return self if obj is None else obj.property(self.name)

    def __set__(self, obj, value):
        if not obj.setProperty(self.name, value):
            raise AttributeError(f"{type(obj).__name__}.{self.name} could not be set to {value!r}")


def _expose_properties(cls) -> None:
    meta = cls.staticMetaObject
    for i in range(meta.propertyOffset(), meta.propertyCount()):  # own properties; bases get theirs
        setattr(cls, meta.property(i).name(), _QtProperty(meta.property(i).name()))


for _module in (QtCore, QtGui, QtWidgets):
    for _name in dir(_module):
        _item = getattr(_module, _name)
        if _name.startswith("Q") or _name == "Qt":
            globals()[_name] = _item
            if isinstance(_item, type) and issubclass(_item, QtCore.QObject) and hasattr(_item, "staticMetaObject"):
                _expose_properties(_item)

Signal, Slot = QtCore.Signal, QtCore.Slot
QtCore.QObject.name = _QtProperty("objectName")  # PythonQt's alias, used by slicer.util.childWidgetVariables


class QUiLoader(QtUiTools.QUiLoader):
    """Knows the stand-ins for Slicer's custom widgets, as Slicer's loader knows the real ones."""

    def __init__(self, parent=None):
        super().__init__(parent)
        from slicer_widgets import CUSTOM_WIDGETS
        for cls in CUSTOM_WIDGETS:
            self.registerCustomWidget(cls)
