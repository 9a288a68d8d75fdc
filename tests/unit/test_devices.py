import pytest

from renderfarm.config import NodeDeclaration, load_nodes
from renderfarm.planning.devices import (
    KNOWN_CARDS,
    Device,
    device_from_declaration,
    device_from_spec,
    known_card,
    parse_compute_capability,
)


def test_parse_compute_capability():
    assert parse_compute_capability("8.6") == (8, 6)
    assert parse_compute_capability(" 12.0 ") == (12, 0)
    assert parse_compute_capability((9, 0)) == (9, 0)
    for bad in ("8", "8.x", "", "sm_86", "8.6.1"):
        with pytest.raises(ValueError, match=r"must look like '8.6'"):
            parse_compute_capability(bad)
    with pytest.raises(ValueError, match=r"\(major, minor\)"):
        parse_compute_capability((8,))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name, vram, cc",
    [
        ("Quadro RTX 6000", 24, (7, 5)),
        ("NVIDIA GeForce RTX 2080 Ti", 11, (7, 5)),
        ("NVIDIA GeForce RTX 3060", 12, (8, 6)),
        ("NVIDIA GeForce RTX 3070", 8, (8, 6)),
        ("NVIDIA GeForce RTX 3090", 24, (8, 6)),
        ("NVIDIA GeForce RTX 4060", 8, (8, 9)),
        ("NVIDIA GeForce RTX 4070", 12, (8, 9)),
        ("NVIDIA GeForce RTX 4090", 24, (8, 9)),
        ("NVIDIA L4", 24, (8, 9)),
        ("NVIDIA L40S", 48, (8, 9)),
        ("NVIDIA A100-SXM4-40GB", 40, (8, 0)),
        ("NVIDIA A100-SXM4-80GB", 80, (8, 0)),
        ("NVIDIA H100 80GB HBM3", 80, (9, 0)),
        ("NVIDIA H200", 141, (9, 0)),
    ],
)
def test_known_cards_as_torch_names_them(name, vram, cc):
    card = known_card(name, vram)
    assert card is not None and card.vram_gib == vram and card.compute_capability == cc
    assert card.fp16_tflops > 0 and card.memory_gbps > 0 and card.pcie_gbps > 0


def test_name_matching_does_not_confuse_neighbours():
    assert known_card("NVIDIA L40S").name == "L40S"
    assert known_card("NVIDIA L4").name == "L4"
    assert known_card("NVIDIA GeForce RTX 4060 Ti") is None  # a different card: fall back to its cc
    assert known_card("NVIDIA RTX 6000 Ada Generation").name == "RTX 6000 Ada"
    assert known_card("A100", vram_gib=79.2).name == "A100 80GB"
    assert known_card("A100", vram_gib=39.4).name == "A100 40GB"
    assert len({c.name for c in KNOWN_CARDS}) == len(KNOWN_CARDS)


def test_capabilities_follow_compute_capability():
    def dev(cc):
        return device_from_spec("x", 24, cc)

    assert (dev("7.5").bf16_native, dev("7.5").fp8_compute) == (False, False)  # Turing
    assert (dev("8.0").bf16_native, dev("8.0").fp8_compute) == (True, False)  # A100
    assert (dev("8.6").bf16_native, dev("8.6").fp8_compute) == (True, False)  # Ampere consumer
    assert (dev("8.9").bf16_native, dev("8.9").fp8_compute) == (True, True)  # Ada
    assert (dev("9.0").bf16_native, dev("9.0").fp8_compute) == (True, True)  # Hopper
    cpu = device_from_spec("CPU", 16, None)
    assert cpu.kind == "cpu" and not cpu.is_cuda and not cpu.bf16_native and cpu.cc_text is None


def test_spec_takes_throughput_from_the_table_and_memory_from_the_caller():
    d = device_from_spec("NVIDIA GeForce RTX 4090", 23.6, (8, 9))
    assert d.vram_gib == 23.6 and d.fp16_tflops == 165.2 and d.figures_from == "known card GeForce RTX 4090"


def test_unknown_card_gets_figures_typical_of_its_compute_capability():
    d = device_from_spec("Mystery GPU", 16, "8.9")
    assert d.figures_from == "typical of compute capability 8.9"
    # between table entries: the nearest generation below; older than all: the oldest
    assert device_from_spec("x", 16, "7.2").fp16_tflops == device_from_spec("y", 16, "7.0").fp16_tflops
    assert device_from_spec("x", 4, "5.2").fp16_tflops == device_from_spec("y", 16, "7.0").fp16_tflops


def test_declaration_uses_the_table_and_the_declared_memory():
    d = device_from_declaration(
        NodeDeclaration(name="rtx", gpu="GeForce RTX 3070", vram_gib=7.5, compute_capability="8.6")
    )
    assert d.name == "GeForce RTX 3070" and d.vram_gib == 7.5 and d.compute_capability == (8, 6)
    assert d.fp16_tflops == 40.6


def test_declaration_without_compute_capability_takes_the_cards():
    # NodeDeclaration defaults compute_capability to 8.6; a named Turing card must not inherit that.
    d = device_from_declaration(NodeDeclaration(name="q", gpu="Quadro RTX 6000", vram_gib=24))
    assert d.compute_capability == (7, 5) and not d.bf16_native


def test_declaration_contradicting_its_card_is_an_error():
    node = NodeDeclaration(name="q", gpu="Quadro RTX 6000", vram_gib=24, compute_capability="8.6")
    with pytest.raises(ValueError, match=r"node 'q'.*compute capability 7.5.*declares 8.6"):
        device_from_declaration(node)


def test_declaration_of_an_unknown_card_uses_its_name_and_cc():
    d = device_from_declaration(NodeDeclaration(name="box", vram_gib=16, compute_capability="8.9"))
    assert d.name == "box" and d.compute_capability == (8, 9)
    assert d.figures_from == "typical of compute capability 8.9"


def test_example_nodes_file_describes_a_turing_and_an_ampere_card():
    devices = [device_from_declaration(n) for n in load_nodes()]
    assert [(d.compute_capability, d.vram_gib) for d in devices] == [((7, 5), 24), ((8, 6), 8)]


def test_device_rejects_impossible_values():
    with pytest.raises(ValueError, match="vram_gib must be positive"):
        Device("x", 0, (8, 6))
    with pytest.raises(ValueError, match="CUDA devices only"):
        Device("x", 8, None, kind="cuda")
    with pytest.raises(ValueError, match="CUDA devices only"):
        Device("x", 8, (8, 6), kind="cpu")


def test_as_dict_is_plain_data():
    d = device_from_spec("NVIDIA H100 80GB HBM3", 80, "9.0").as_dict()
    assert d["compute_capability"] == "9.0" and d["bf16_native"] and d["fp8_compute"] and d["kind"] == "cuda"


def test_a_node_record_gives_back_its_card():
    from renderfarm.planning.devices import device_from_record, device_from_spec

    card = device_from_spec("Quadro RTX 6000", 24, "7.5")
    assert device_from_record({"name": "n", "card": card.as_dict()}) == card
    assert device_from_record({"name": "n"}) is None


@pytest.mark.parametrize("card", [{"vram_gib": 8}, "garbage", [1], {"name": "x", "vram_gib": "8"},
                                  {"name": "x", "vram_gib": 0}, {"name": "x", "vram_gib": 8, "compute_capability": "8"},
                                  {"name": "x", "vram_gib": 8, "compute_capability": 8.6},
                                  {"name": "x", "vram_gib": 8, "ram_gib": "lots"}])
def test_a_card_that_does_not_describe_a_device_is_named_not_a_key_error(card):
    from renderfarm.errors import CorruptRecord
    from renderfarm.planning.devices import device_from_record

    with pytest.raises(CorruptRecord, match="node 'n': its card"):
        device_from_record({"name": "n", "card": card})
