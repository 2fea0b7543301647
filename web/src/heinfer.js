// heinfer in the page: node-seal (SEAL 4.1.2) keys, the packing contract, the wire framing.
// Everything a browser needs to talk to `heinfer serve`, from the public model spec alone
// (docs/SERVICE.md, "Packing contract" and "Wire format"). No secret byte leaves this module
// except through `exportSecretKey`, which the page only ever passes to WebCrypto.

const MAGIC = [0x48, 0x45, 0x49, 0x57]; // "HEIW"
export const KIND = { CIPHERTEXTS: 1, EVAL_KEYS: 2 };
export const SECTION = { CIPHERTEXT: 1, PUBLIC_KEY: 2, RELIN_KEYS: 3, GALOIS_KEYS: 4 };

/** Frame SEAL blobs as one heinfer wire body (heinfer/wire.py, version 1). */
export function frame(kind, sections) {
  const total = 16 + 16 * sections.length + sections.reduce((n, [, b]) => n + b.length, 0);
  const out = new Uint8Array(total);
  const dv = new DataView(out.buffer);
  out.set(MAGIC, 0);
  dv.setUint16(4, 1, true);
  dv.setUint16(6, kind, true);
  dv.setUint32(8, sections.length, true);
  let at = 16 + 16 * sections.length;
  sections.forEach(([type, bytes], i) => {
    dv.setUint16(16 + 16 * i, type, true);
    dv.setBigUint64(16 + 16 * i + 8, BigInt(bytes.length), true);
    out.set(bytes, at);
    at += bytes.length;
  });
  return out;
}

/** The payloads of a wire body (checked: magic, version, sizes). */
export function unframe(body, kind) {
  const b = new Uint8Array(body);
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  if (b.length < 16 || MAGIC.some((m, i) => b[i] !== m)) throw new Error("not a heinfer wire body");
  if (dv.getUint16(4, true) !== 1 || dv.getUint16(6, true) !== kind) throw new Error("wire version or kind");
  const count = dv.getUint32(8, true);
  let at = 16 + 16 * count;
  const items = [];
  for (let i = 0; i < count; i++) {
    const len = Number(dv.getBigUint64(16 + 16 * i + 8, true));
    if (at + len > b.length) throw new Error("wire body truncated");
    items.push(b.subarray(at, at + len));
    at += len;
  }
  if (at !== b.length) throw new Error("wire body has trailing bytes");
  return items;
}

/** Slot vectors for one input, from the contract's runs (element numbers in C order). */
export function pack(contract, x) {
  const c = contract.input;
  const size = c.shape.reduce((a, b) => a * b, 1);
  if (x.length !== size) throw new Error(`input has ${x.length} values, the model takes ${size}`);
  if (c.batch) throw new Error("batch contracts are for the SDK's throughput mode");
  const vecs = Array.from({ length: c.ciphertexts }, () => new Float64Array(contract.slots));
  for (const [ct, slot, sstep, count, elem, estep] of c.runs) {
    const v = vecs[ct];
    for (let k = 0; k < count; k++) v[slot + k * sstep] = x[elem + k * estep];
  }
  return vecs;
}

/** Output values (scaled) from decrypted slot vectors. */
export function unpack(contract, vectors) {
  const o = contract.output;
  const size = o.shape.reduce((a, b) => a * b, 1);
  const out = new Float64Array(size);
  for (const [ct, slot, sstep, count, elem, estep] of o.runs) {
    for (let k = 0; k < count; k++) out[elem + k * estep] = vectors[ct][slot + k * sstep] * o.scale;
  }
  return out;
}

/** Decoded outputs -> logits: unchanged for plain models; conformal models (output.kind
 *  "conformal") decode z (one per class) then q, and logits = z / (c0 ||x|| + q) + bias, with x
 *  the preprocessed input only this page knows (heinfer.codec.finish_output). */
export function finishOutput(spec, decoded, x) {
  const out = spec.output;
  if (out.kind !== "conformal") return Float64Array.from(decoded);
  const norm = Math.sqrt(Array.from(x).reduce((a, v) => a + v * v, 0));
  const q = decoded[decoded.length - 1];
  return Float64Array.from(decoded.slice(0, -1), (z, i) => z / (out.c0 * norm + q) + out.bias[i]);
}

export function softmax(z) {
  const m = Math.max(...z);
  const e = Array.from(z, (v) => Math.exp(v - m));
  const s = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / s);
}

/** A SEAL context for the spec's CKKS parameters (what Pyfhel builds on the server). */
export function makeContext(seal, spec) {
  const p = spec.params;
  const parms = new seal.EncryptionParameters(seal.SchemeType.ckks);
  parms.setPolyModulusDegree(p.poly_modulus_degree);
  parms.setCoeffModulus(seal.CoeffModulus.Create(p.poly_modulus_degree,
                                                 Int32Array.from(p.coeff_mod_bits)));
  const level = p.insecure ? seal.SecLevelType.none : seal.SecLevelType.tc128;
  const ctx = new seal.SEALContext(parms, true, level);
  if (!ctx.parametersSet()) throw new Error(`SEAL rejects the model's parameters: ${ctx.toHuman()}`);
  return ctx;
}

const zstd = (seal) => seal.ComprModeType.zstd;
const bytes = (a) => (a instanceof Uint8Array ? a : new Uint8Array(a));

/** The client's keys for one model: made here, or restored from a stored secret key. */
export class Keys {
  constructor(seal, spec, secretKeyBytes = null) {
    this.seal = seal;
    this.spec = spec;
    if (!spec.backend.includes("seal-4.1")) {
      throw new Error(`model ${spec.name} is served by ${spec.backend}; this page speaks SEAL 4.1 ` +
                      "(node-seal): the operator must compile it with --backend pyfhel");
    }
    if (!spec.packing) throw new Error("the server publishes no packing contract (heinfer too old)");
    this.ctx = makeContext(seal, spec);
    if (secretKeyBytes) {
      const sk = new seal.SecretKey();
      sk.loadFromArray(this.ctx, bytes(secretKeyBytes));
      this.keygen = new seal.KeyGenerator(this.ctx, sk);
    } else {
      this.keygen = new seal.KeyGenerator(this.ctx);
    }
    this.sk = this.keygen.secretKey();
    this.pk = this.keygen.createPublicKey();
    this.encoder = new seal.CKKSEncoder(this.ctx);
    this.encryptor = new seal.Encryptor(this.ctx, this.pk, this.sk);
    this.decryptor = new seal.Decryptor(this.ctx, this.sk);
  }

  /** The EVAL_KEYS body: relinearization and Galois keys (seeded) and the public key. */
  evalKeysBody() {
    const relin = bytes(this.keygen.createRelinKeysSerializable().saveToArray(zstd(this.seal)));
    const sections = [[SECTION.RELIN_KEYS, relin]];
    const steps = this.spec.rotation_steps;
    if (steps.length) {
      const g = this.keygen.createGaloisKeysSerializableWithSteps(Int32Array.from(steps));
      sections.push([SECTION.GALOIS_KEYS, bytes(g.saveToArray(zstd(this.seal)))]);
    }
    sections.push([SECTION.PUBLIC_KEY, bytes(this.pk.saveToArray(zstd(this.seal)))]);
    return frame(KIND.EVAL_KEYS, sections);
  }

  /** Encrypt one preprocessed input (flat, C order): seeded symmetric ciphertexts, framed. */
  encrypt(x) {
    const c = this.spec.packing.input;
    const items = pack(this.spec.packing, x).map((v) => {
      const pt = new this.seal.Plaintext();
      this.encoder.encode(v, c.scale, pt);
      const ser = this.encryptor.encryptSymmetricSerializable(pt);
      const out = bytes(ser.saveToArray(zstd(this.seal)));
      ser.delete();
      pt.delete();
      return out;
    });
    return frame(KIND.CIPHERTEXTS, items.map((b) => [SECTION.CIPHERTEXT, b]));
  }

  /** Outputs (scaled) from the server's answer body. */
  decrypt(body) {
    const vectors = unframe(body, KIND.CIPHERTEXTS).map((b) => {
      const ct = new this.seal.Ciphertext();
      ct.loadFromArray(this.ctx, b);
      const pt = new this.seal.Plaintext();
      this.decryptor.decrypt(ct, pt);
      const v = Float64Array.from(this.encoder.decodeFloat64(pt));
      ct.delete();
      pt.delete();
      return v;
    });
    return unpack(this.spec.packing, vectors);
  }

  /** The secret key's bytes: only for wrapping with the user's passphrase (WebCrypto). */
  exportSecretKey() {
    return bytes(this.sk.saveToArray(this.seal.ComprModeType.none));
  }
}

/** Pixels (grey 0..255, row-major h x w) -> the model's input, normalized as published. */
export function preprocess(grey, preprocessing) {
  const n = (preprocessing && preprocessing.normalization) || { mean: 0, std: 1 };
  const mean = Array.isArray(n.mean) ? n.mean[0] : n.mean;
  const std = Array.isArray(n.std) ? n.std[0] : n.std;
  return Float64Array.from(grey, (p) => (p / 255 - mean) / std);
}
