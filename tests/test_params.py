import pytest

from heinfer.backends import make_backend
from heinfer.errors import InsecureParamsError
from heinfer.params import MAX_LOG_Q_128, CKKSParams


def test_table_matches_design_notes():
    assert MAX_LOG_Q_128[4096] == 109
    assert MAX_LOG_Q_128[8192] == 218
    assert MAX_LOG_Q_128[16384] == 438
    assert MAX_LOG_Q_128[32768] == 881


def test_accepts_128_bit_chain():
    p = CKKSParams(poly_modulus_degree=8192, coeff_mod_bits=[36, 29, 29, 29, 29, 29, 36],
                   scale_bits=29)
    assert p.security_bits() == 128
    assert p.depth == 5 and p.top_level == 5 and p.slots == 4096


@pytest.mark.parametrize("n,bits", [(8192, [60, 40, 40, 40, 40]),   # 220 > 218
                                    (4096, [40, 30, 40]),             # 110 > 109
                                    (2048, [30, 30])])                # not in the table at all
def test_refuses_below_128_bits(n, bits):
    with pytest.raises(InsecureParamsError, match="128-bit"):
        CKKSParams(poly_modulus_degree=n, coeff_mod_bits=bits, scale_bits=25)


def test_insecure_only_by_name():
    p = CKKSParams.insecure_for_tests(2048, [30, 25, 30], 25)
    assert p.insecure and p.security_bits() == 0
    assert "INSECURE" in p.describe()
    be = make_backend(p)  # SEAL accepts it because we asked by name
    assert be.slots == 1024


@pytest.mark.parametrize("kwargs", [dict(poly_modulus_degree=3000, coeff_mod_bits=[30, 30]),
                                    dict(poly_modulus_degree=8192, coeff_mod_bits=[30]),
                                    dict(poly_modulus_degree=8192, coeff_mod_bits=[70, 30])])
def test_refuses_malformed(kwargs):
    with pytest.raises(InsecureParamsError):
        CKKSParams(scale_bits=25, **kwargs)
