# Ed25519 verification and SHA-512 (node.ed25519) in the MicroPython VM:
# the FIPS 180 and RFC 8032 published vectors, vectors made once with the
# `cryptography` package (tests/test_ed25519_host.py checks that they are
# its output), and every way a signature, key or input can be wrong.
import time
from binascii import unhexlify

from node.ed25519 import SHA512, sha512, verify

H = unhexlify
L = 2**252 + 27742317777372353535851937790883648493

# FIPS 180-2 appendix C: SHA-512 of "abc", of the empty string, and of the
# 896-bit two-block message
SHA512_VECTORS = (
    (b"", "cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce"
          "47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e"),
    (b"abc", "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a"
             "2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f"),
    (b"abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopq"
     b"klmnopqrlmnopqrsmnopqrstnopqrstu",
     "8e959b75dae313da8cf4f72814fc143f8f7779c6eb9f7fa17299aeadb6889018"
     "501d289e4900f7e4331b99dec4b5433ac7d329eeb6dd26545e96e55b874be909"),
)

# RFC 8032 section 7.1: (secret key, public key, message, signature). The
# secret keys are not used here; the host test signs with them to check
# these constants.
RFC8032 = (
    ("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
     "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
     "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"),
    ("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
     "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c", "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
     "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"),
    ("c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
     "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025", "af82",
     "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac"
     "18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a"),
    # TEST 1024 (a 1023-byte message)
    ("f5e5767cf153319517630f226876b86c8160cc583bc013744c6bf255f5cc0ee5",
     "278117fc144c72340f67d0f2316e8386ceffbf2b2428c9c51fef7c597f1d426e",
     "08b8b2b733424243760fe426a4b54908632110a66c2f6591eabd3345e3e4eb98fa6e264bf09efe12ee50f8f54e9f77b1e355"
     "f6c50544e23fb1433ddf73be84d879de7c0046dc4996d9e773f4bc9efe5738829adb26c81b37c93a1b270b20329d658675fc"
     "6ea534e0810a4432826bf58c941efb65d57a338bbd2e26640f89ffbc1a858efcb8550ee3a5e1998bd177e93a7363c344fe6b"
     "199ee5d02e82d522c4feba15452f80288a821a579116ec6dad2b3b310da903401aa62100ab5d1a36553e06203b33890cc9b8"
     "32f79ef80560ccb9a39ce767967ed628c6ad573cb116dbefefd75499da96bd68a8a97b928a8bbc103b6621fcde2beca1231d"
     "206be6cd9ec7aff6f6c94fcd7204ed3455c68c83f4a41da4af2b74ef5c53f1d8ac70bdcb7ed185ce81bd84359d44254d9562"
     "9e9855a94a7c1958d1f8ada5d0532ed8a5aa3fb2d17ba70eb6248e594e1a2297acbbb39d502f1a8c6eb6f1ce22b3de1a1f40"
     "cc24554119a831a9aad6079cad88425de6bde1a9187ebb6092cf67bf2b13fd65f27088d78b7e883c8759d2c4f5c65adb7553"
     "878ad575f9fad878e80a0c9ba63bcbcc2732e69485bbc9c90bfbd62481d9089beccf80cfe2df16a2cf65bd92dd597b0707e0"
     "917af48bbb75fed413d238f5555a7a569d80c3414a8d0859dc65a46128bab27af87a71314f318c782b23ebfe808b82b0ce26"
     "401d2e22f04d83d1255dc51addd3b75a2b1ae0784504df543af8969be3ea7082ff7fc9888c144da2af58429ec96031dbcad3"
     "dad9af0dcbaaaf268cb8fcffead94f3c7ca495e056a9b47acdb751fb73e666c6c655ade8297297d07ad1ba5e43f1bca32301"
     "651339e22904cc8c42f58c30c04aafdb038dda0847dd988dcda6f3bfd15c4b4c4525004aa06eeff8ca61783aacec57fb3d1f"
     "92b0fe2fd1a85f6724517b65e614ad6808d6f6ee34dff7310fdc82aebfd904b01e1dc54b2927094b2db68d6f903b68401ade"
     "bf5a7e08d78ff4ef5d63653a65040cf9bfd4aca7984a74d37145986780fc0b16ac451649de6188a7dbdf191f64b5fc5e2ab4"
     "7b57f7f7276cd419c17a3ca8e1b939ae49e488acba6b965610b5480109c8b17b80e1b7b750dfc7598d5d5011fd2dcc5600a3"
     "2ef5b52a1ecc820e308aa342721aac0943bf6686b64b2579376504ccc493d97e6aed3fb0f9cd71a43dd497f01f17c0e2cb37"
     "97aa2a2f256656168e6c496afc5fb93246f6b1116398a346f1a641f3b041e989f7914f90cc2c7fff357876e506b50d334ba7"
     "7c225bc307ba537152f3f1610e4eafe595f6d9d90d11faa933a15ef1369546868a7f3a45a96768d40fd9d03412c091c6315c"
     "f4fde7cb68606937380db2eaaa707b4c4185c32eddcdd306705e4dc1ffc872eeee475a64dfac86aba41c0618983f8741c5ef"
     "68d3a101e8a3b8cac60c905c15fc910840b94c00a0b9d0",
     "0aab4c900501b3e24d7cdf4663326a3a87df5e4843b2cbdb67cbf6e460fec350"
     "aa5371b1508f9f4528ecea23c436d94b5e8fcd4f681e30a6ac00a9704a188a03"),
)

# Made once with cryptography 50.0.2: (seed, public key, message length,
# signature); the seed is sha256(b"iwaki ota test key %d" % i), the message
# is message(length).
CRYPTOGRAPHY = (
    ("ef87c8c0d641781232c44520768f7635150d4fbf7160dfa6d4342298ee60e604",
     "5ec920915c55a315508469bf2d2db0412be3db858e15cea1cfdd5e20ec3ed17a", 0,
     "5ab5bcfe23c7ddc4e67ec71afae983abbb217afc53f9d124e58e8dd030d4c050"
     "f8cf73b254ca6d117c8ce613b234ed46e74ab4fab46f89cf2263548ee51c3d0c"),
    ("d326620c3881acccc1bab478a847db09fa6eb787ecf4e08c57f6c1b186ad209d",
     "af946792e443c740b214cdf43e02d2914ff8346216690f3b508a2dad13fcc223", 1,
     "2981b00bce737a4136c044725de22cf24f1f795321a182fd685bacb4a3e834af"
     "60fd0fd99da283cb4961c26f5cdcedf3bf42c7e6e1a65baaa58bacf095269908"),
    ("b32ab70996b9f338c161826cc725234c8c59723467fb3de2937e814f1854eda2",
     "7d32c45148cda0417e220e8256a885ac6d1a7dd8c659744e13fe4cc557f7f085", 200,
     "0237ea43c627c829d0ffde418f3c943a25c3689da64184de14409bc8d8e10e26"
     "d32f819495aabe495ad059acf03c6cb2604dd45a5791f01ef4cdba57f9a10602"),
    ("9d72bf87949f0a5c912a7dd904006fab28e102b0d5d90d35390b22ecdfa35969",
     "0229bbdfd1243d8258fb7522c0806c529c685fe1b57c195ad18c1765857872a9", 2000,
     "1adc7e4dc139aadf478d939766523946700464f40d7bde985120da15c1b7f1fa"
     "2c0e114a85f0cc47dd4e6902141c8b3e06ffa3e46d687e1244e488f8665f1204"),
)

IDENTITY = H("01" + "00" * 31)  # the neutral point, canonical
IDENTITY_P1 = H("ee" + "ff" * 30 + "7f")  # the same point as y = p + 1: not canonical


def message(n):
    return bytes((i * 73 + 41) % 251 for i in range(n))


def flip(b, bit):
    out = bytearray(b)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def rfc(i):
    _, key, msg, sig = RFC8032[i]
    return H(key), H(msg), H(sig)


def test_sha512_fips_vectors():
    for data, digest in SHA512_VECTORS:
        assert sha512(data) == H(digest), data
    assert sha512(bytearray(b"abc")) == sha512(memoryview(b"xabc")[1:]) == H(SHA512_VECTORS[1][1])


def test_sha512_in_pieces_equals_at_once():
    data = message(1000)
    whole = sha512(data)
    for step in (1, 7, 111, 112, 127, 128, 129, 300):
        h = SHA512()
        for i in range(0, len(data), step):
            h.update(data[i:i + step])
        assert h.digest() == whole, step
    h = SHA512(data[:500])
    assert h.digest() == sha512(data[:500])  # digest() does not end the hash
    h.update(data[500:])
    assert h.digest() == whole


def test_rfc8032_vectors_verify():
    for i in range(len(RFC8032)):
        key, msg, sig = rfc(i)
        assert verify(key, msg, sig), i
    assert len(rfc(3)[1]) == 1023


def test_vectors_made_with_cryptography_verify():
    for _, key, n, sig in CRYPTOGRAPHY:
        assert verify(H(key), message(n), H(sig)), n
        assert not verify(H(key), message(n + 1), H(sig)), n


def test_a_flipped_bit_anywhere_is_refused():
    key, msg, sig = rfc(2)
    for bit in range(len(msg) * 8):
        assert not verify(key, flip(msg, bit), sig), ("message", bit)
    for bit in range(0, 256, 5):
        assert not verify(key, msg, flip(sig, bit)), ("R", bit)
    for bit in range(256, 512, 5):
        assert not verify(key, msg, flip(sig, bit)), ("S", bit)
    for bit in range(0, 256, 5):
        assert not verify(flip(key, bit), msg, sig), ("key", bit)
    long_key, long_msg, long_sig = H(CRYPTOGRAPHY[3][1]), message(2000), H(CRYPTOGRAPHY[3][3])
    assert not verify(long_key, flip(long_msg, 2000 * 8 - 1), long_sig)
    assert not verify(long_key, long_msg[:-1], long_sig)
    assert not verify(key, long_msg, long_sig)  # another key


def test_s_not_below_the_group_order_is_refused():
    key, msg, sig = rfc(1)
    s = int.from_bytes(sig[32:], "little")
    # S + L is the same scalar mod L: the equation holds, only the range check refuses it
    assert not verify(key, msg, sig[:32] + (s + L).to_bytes(32, "little"))
    assert not verify(key, msg, sig[:32] + L.to_bytes(32, "little"))
    assert not verify(key, msg, sig[:32] + b"\xff" * 32)


def test_wrong_lengths_and_types_are_false_not_errors():
    key, msg, sig = rfc(1)
    assert verify(key, msg, sig)
    for k, m, s in ((key[:31], msg, sig), (key + b"\x00", msg, sig), (b"", msg, sig),
                    (key, msg, sig[:63]), (key, msg, sig + b"\x00"), (key, msg, b""),
                    (key.hex(), msg, sig), (key, "r", sig), (key, msg, sig.hex()),
                    (None, msg, sig), (key, None, sig), (key, msg, None), (list(key), msg, sig)):
        assert verify(k, m, s) is False


def test_bytearray_and_memoryview_inputs():
    key, msg, sig = rfc(3)
    assert verify(bytearray(key), memoryview(msg), bytearray(sig)) is True
    assert verify(memoryview(b"?" + key)[1:], bytearray(msg), memoryview(sig)) is True


def test_a_key_that_is_not_a_valid_encoding_is_refused():
    _, msg, sig = rfc(1)
    x0_negative = H("01" + "00" * 30 + "80")  # x = 0 with the sign bit set
    for key in (b"\x02" * 32,  # y not on the curve
                b"\xff" * 31 + b"\x7f",  # y = 2^255 - 1 >= p
                IDENTITY_P1,  # y = p + 1: the identity, not canonically
                x0_negative):
        assert not verify(key, msg, sig), key
    # the identity, canonically, decodes (see below); its other encodings do not
    assert verify(IDENTITY, b"any", IDENTITY + bytes(32))
    assert not verify(IDENTITY_P1, b"any", IDENTITY + bytes(32))
    assert not verify(x0_negative, b"any", IDENTITY + bytes(32))


def test_small_order_key_and_non_canonical_r():
    # Cofactorless RFC 8032, as cryptography: a small-order key (here the
    # identity) lets (R = identity, S = 0) pass for any message; a node only
    # trusts keys it was given, never one from the message. An R that is
    # not canonical never matches, as its decoding would fail.
    assert verify(IDENTITY, b"anything", IDENTITY + bytes(32))
    assert not verify(IDENTITY, b"anything", IDENTITY_P1 + bytes(32))
    key, msg, sig = rfc(1)
    assert not verify(key, msg, IDENTITY_P1 + sig[32:])


def test_a_2kb_verify_is_fast_in_the_vm():
    _, key, n, sig = CRYPTOGRAPHY[3]
    key, msg, sig = H(key), message(n), H(sig)
    t0 = time.ticks_ms()
    for _ in range(3):
        assert verify(key, msg, sig)
    ms = time.ticks_diff(time.ticks_ms(), t0) / 3
    print("verify of a 2000-byte message: %d ms in the VM" % ms)
    assert ms < 1000
