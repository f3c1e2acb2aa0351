"""A tiny graph builder that writes ComfyUI UI-format workflows (version 0.4).

Nodes are added with named inputs; widget values are placed in the front end's widget order
(taken from the node schemas), links get ids, and ``layout`` places the nodes from the sizes the
front end gives them. A widget input can be fed by a link (``Wire``, e.g. the loader's steps into
KSampler): the slot is saved the way the front end saves a linked widget, and the widget keeps a
value for when the link is removed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import layout
from .wfkit import combo_choices, input_kind, input_options, is_widget, ordered_inputs


def ui_type(output_type) -> str:
    """A V3 Combo output's type is its list of choices; the front end saves such slots as COMBO."""
    return output_type if isinstance(output_type, str) else "COMBO"


@dataclass(frozen=True)
class Out:
    node: int
    slot: int


@dataclass
class Node:
    id: int
    type: str
    inputs: dict
    title: str | None = None
    depth: int = 0
    outs: list = field(default_factory=list)

    def __getitem__(self, slot: int) -> Out:
        return Out(self.id, slot)


@dataclass(frozen=True)
class Wire:
    """A widget input fed by a link; ``value`` stays in the widget for when the link is removed."""
    out: Out
    value: object


def link_of(value) -> Out | None:
    return value.out if isinstance(value, Wire) else value if isinstance(value, Out) else None


class Graph:
    def __init__(self, schemas: dict):
        self.schemas = schemas
        self.nodes: list[Node] = []
        self.notes: list[tuple[int, str, str]] = []
        self._next = 1

    def add(self, type_: str, title: str | None = None, **inputs) -> Node:
        if type_ not in self.schemas:
            raise KeyError(f"unknown node type {type_!r}")
        names = {name for name, _, _ in ordered_inputs(self.schemas[type_])}
        unknown = set(inputs) - names
        if unknown:
            raise KeyError(f"{type_}: unknown inputs {sorted(unknown)}")
        depth = 1 + max((self._node(link_of(v).node).depth for v in inputs.values() if link_of(v)), default=-1)
        node = Node(self._next, type_, inputs, title, depth)
        self._next += 1
        self.nodes.append(node)
        return node

    def note(self, text: str, title: str = "Models needed") -> None:
        self.notes.append((self._next, title, text))
        self._next += 1

    def _node(self, node_id: int) -> Node:
        return next(n for n in self.nodes if n.id == node_id)

    def _widget_values(self, node: Node) -> list:
        values = []
        for name, spec, _ in ordered_inputs(self.schemas[node.type]):
            if not is_widget(spec):
                continue
            given = node.inputs.get(name)
            if isinstance(given, Wire):
                value = given.value
            elif name in node.inputs and not isinstance(given, Out):
                value = given
            elif "default" in input_options(spec):
                value = input_options(spec)["default"]
            elif input_kind(spec) == "COMBO" and combo_choices(spec):
                value = combo_choices(spec)[0]
            else:
                raise ValueError(f"{node.type}: input {name!r} has no default; give a value")
            values.append(value)
            opts = input_options(spec)
            if opts.get("control_after_generate"):
                values.append("fixed")  # reproducible example: the seed does not change per run
            if opts.get("image_upload"):
                values.append("image")
        return values

    def _slots(self, node: Node, links: list, out_links: dict) -> list:
        """Input slots as the front end saves them: link inputs in schema order, then linked widgets."""
        schema = self.schemas[node.type]
        specs = list(ordered_inputs(schema))
        ordered = [s for s in specs if not is_widget(s[1])] + [s for s in specs if is_widget(s[1])]
        slots = []
        for name, spec, _ in ordered:
            out = link_of(node.inputs.get(name))
            if is_widget(spec) and out is None:
                continue
            link_id = None
            if out is not None:
                link_id = len(links) + 1
                out_type = ui_type(self.schemas[self._node(out.node).type]["output"][out.slot])
                links.append([link_id, out.node, out.slot, node.id, len(slots), out_type])
                out_links.setdefault((out.node, out.slot), []).append(link_id)
            slot = {"name": name, "type": input_kind(spec), "link": link_id}
            if is_widget(spec):
                slot["widget"] = {"name": name}
            slots.append(slot)
        return slots

    def _one_line_widgets(self, node: Node) -> list:
        """(label, value) of the node's combo and one-line text widgets: they set how wide it must be."""
        out = []
        for name, spec, _ in ordered_inputs(self.schemas[node.type]):
            value = node.inputs.get(name)
            if is_widget(spec) and isinstance(value, str) and not input_options(spec).get("multiline"):
                out.append((name, value))
        return out

    def _positions(self) -> dict:
        sizes = layout.measured_sizes()
        ids = [n.id for n in self.nodes]
        links = {n.id: [link_of(v).node for v in n.inputs.values() if link_of(v)] for n in self.nodes}
        size_of = {n.id: layout.node_size(n.type, sizes, self._one_line_widgets(n)) for n in self.nodes}
        notes = [(note_id, layout.note_size(text)) for note_id, _, text in self.notes]
        return layout.place(ids, links, size_of, notes)

    def to_ui(self, extra: dict | None = None) -> dict:
        links, ui_nodes, out_links = [], [], {}
        placed = self._positions()
        for order, node in enumerate(self.nodes):
            pos, size = placed[node.id]
            ui = {
                "id": node.id, "type": node.type, "pos": pos, "size": size,
                "flags": {}, "order": order, "mode": 0, "inputs": self._slots(node, links, out_links), "outputs": [],
                "properties": {"Node name for S&R": node.type},
                "widgets_values": self._widget_values(node),
            }
            if node.title:
                ui["title"] = node.title
            ui_nodes.append(ui)
        for ui in ui_nodes:
            schema = self.schemas[ui["type"]]
            names = schema.get("output_name") or schema["output"]
            ui["outputs"] = [
                {"name": names[i], "type": ui_type(t), "links": out_links.get((ui["id"], i), []), "slot_index": i}
                for i, t in enumerate(schema["output"])
            ]
        for node_id, title, text in self.notes:
            pos, size = placed[node_id]
            ui_nodes.append({
                "id": node_id, "type": "Note", "title": title, "pos": pos, "size": size,
                "flags": {}, "order": len(ui_nodes), "mode": 0, "inputs": [], "outputs": [],
                "properties": {}, "widgets_values": [text], "color": "#432", "bgcolor": "#653",
            })
        return {
            "last_node_id": self._next - 1, "last_link_id": len(links),
            "nodes": ui_nodes, "links": links, "groups": [], "config": {},
            "extra": dict(extra or {}), "version": 0.4,
        }
