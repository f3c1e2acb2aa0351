"""A tiny graph builder that writes ComfyUI UI-format workflows (version 0.4).

Nodes are added with named inputs; widget values are placed in the front end's widget order
(taken from the node schemas), links get ids, and nodes are laid out in columns by depth.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .wfkit import extra_widget_values, input_kind, input_options, is_widget, ordered_inputs, combo_choices


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
        depth = 1 + max((self._node(v.node).depth for v in inputs.values() if isinstance(v, Out)), default=-1)
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
            if name in node.inputs:
                value = node.inputs[name]
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

    def to_ui(self, extra: dict | None = None) -> dict:
        links, ui_nodes = [], []
        out_links: dict[tuple[int, int], list[int]] = {}
        rows: dict[int, int] = {}
        for order, node in enumerate(self.nodes):
            schema = self.schemas[node.type]
            slots = []
            for name, spec, _ in ordered_inputs(schema):
                if is_widget(spec):
                    continue
                link_id = None
                value = node.inputs.get(name)
                if isinstance(value, Out):
                    link_id = len(links) + 1
                    out_type = ui_type(self.schemas[self._node(value.node).type]["output"][value.slot])
                    links.append([link_id, value.node, value.slot, node.id, len(slots), out_type])
                    out_links.setdefault((value.node, value.slot), []).append(link_id)
                slots.append({"name": name, "type": input_kind(spec), "link": link_id})
            row = rows.get(node.depth, 0)
            rows[node.depth] = row + 1
            n_widgets = len(self._widget_values(node))
            ui = {
                "id": node.id, "type": node.type,
                "pos": [40 + 360 * node.depth, 40 + 260 * row],
                "size": [320, 60 + 26 * (max(len(slots), len(schema["output"])) + n_widgets)],
                "flags": {}, "order": order, "mode": 0, "inputs": slots, "outputs": [],
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
        for k, (node_id, title, text) in enumerate(self.notes):
            ui_nodes.append({
                "id": node_id, "type": "Note", "title": title, "pos": [40 + 460 * k, -300], "size": [440, 260],
                "flags": {}, "order": len(ui_nodes), "mode": 0, "inputs": [], "outputs": [],
                "properties": {}, "widgets_values": [text], "color": "#432", "bgcolor": "#653",
            })
        return {
            "last_node_id": self._next - 1, "last_link_id": len(links),
            "nodes": ui_nodes, "links": links, "groups": [], "config": {},
            "extra": dict(extra or {}), "version": 0.4,
        }
