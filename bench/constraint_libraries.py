"""Which constraint library: llguidance, xgrammar and outlines-core on the Llama-2 vocabulary (32k pieces).

    pip install llguidance xgrammar outlines-core   # in a scratch environment: xgrammar pulls torch
    python -m openelm_mlx.bench.constraint_libraries --tokenizer tokenizer.model [llguidance xgrammar outlines-core]

For each library that is installed: the time to build its view of the vocabulary, to compile the nested
schema of bench/structured.py, the per-token mask time along a valid answer (compact and spaced JSON),
and which JSON Schema features it compiles or refuses (compiling says nothing of enforcing). The runtime
uses llguidance (docs/structured-output.md says why); this script is how that was decided.
"""
import argparse
import json
import sys
import time

import numpy as np
import sentencepiece as spm

from .structured import NESTED_SCHEMA


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m openelm_mlx.bench.constraint_libraries")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("libraries", nargs="*", default=["llguidance", "xgrammar", "outlines-core"])
    cli = parser.parse_args()
    sp = spm.SentencePieceProcessor(model_file=cli.tokenizer)
    V = sp.get_piece_size(); EOS = sp.eos_id()
    schema = NESTED_SCHEMA
    instance = {"id": 42, "customer": {"name": "Kim Minji", "email": "minji.kim@example.com",
                "address": {"city": "Seoul", "country": "KR"}}, "items": [{"sku": "ABC-1234", "quantity": 2, "price": 19.5},
                {"sku": "XYZ-0001", "quantity": 1, "price": 5}], "status": "paid"}
    def tokenize(text):
        pre = sp.encode("\n"); ids = sp.encode("\n" + text); assert ids[:len(pre)] == pre; return ids[len(pre):]
    def piece_bytes(i):
        if sp.is_byte(i): return bytes([int(sp.id_to_piece(i)[3:5], 16)])
        if sp.is_control(i) or sp.is_unknown(i): return b"\xff" + sp.id_to_piece(i).encode()
        return sp.id_to_piece(i).replace("\u2581", " ").encode()
    pieces = [piece_bytes(i) for i in range(V)]
    texts = {"compact": json.dumps(instance, separators=(",", ":")), "spaced": json.dumps(instance)}
    features = {
      "nested+required+additionalProperties": schema,
      "array min/max items": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3},
      "string pattern": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
      "string min/maxLength": {"type": "string", "minLength": 2, "maxLength": 5},
      "number bounds": {"type": "number", "minimum": -1.5, "maximum": 2.5},
      "integer exclusive bounds": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10},
      "enum": {"enum": ["a", 1, None]},
      "const": {"const": "x"},
      "anyOf": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
      "oneOf": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
      "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}, {"type": "object", "properties": {"b": {"type": "string"}}}]},
      "$ref/$defs recursion": {"$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"}, "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}}, "required": ["v"]}}, "$ref": "#/$defs/node"},
      "format date-time": {"type": "string", "format": "date-time"},
      "type array [string,null]": {"type": ["string", "null"]},
      "uniqueItems": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
      "multipleOf": {"type": "integer", "multipleOf": 5},
      "patternProperties": {"type": "object", "patternProperties": {"^x": {"type": "integer"}}},
    }

    def timeit(fn, n=1):
        t = time.perf_counter(); r = None
        for _ in range(n): r = fn()
        return (time.perf_counter() - t) / n, r

    def walk(make_state, mask, advance, text):
        ids = tokenize(text); times = []
        state = make_state()
        for t in ids:
            t0 = time.perf_counter(); mask(state); times.append(time.perf_counter() - t0)
            if not advance(state, t): return None, ids
        t0 = time.perf_counter(); mask(state); times.append(time.perf_counter() - t0)
        return times, ids

    def report(name, compile_fn, make_state, mask, advance, feature_fn):
        compile_s, compiled = timeit(lambda: compile_fn(schema))
        print(f"\n== {name}: compile nested schema {compile_s*1000:.1f} ms")
        for style, text in texts.items():
            times, ids = walk(lambda: make_state(compiled), mask, advance, text)
            if times is None: print(f"  {style}: instance rejected"); continue
            times = np.array(times) * 1000
            print(f"  {style}: {len(ids)} tokens, mask ms mean {times.mean():.3f} median {np.median(times):.3f} p95 {np.percentile(times,95):.3f} max {times.max():.3f}")
        ok, bad = [], []
        for fname, s in features.items():
            try:
                r = feature_fn(s); (ok if r is None else bad).append(fname if r is None else f"{fname} ({r[:60]})")
            except Exception as e:
                bad.append(f"{fname} ({type(e).__name__}: {str(e)[:60]})")
        print(f"  features accepted {len(ok)}/{len(features)}; refused: {bad}")

    which = cli.libraries
    if "llguidance" in which:
        import llguidance, llguidance.numpy as lnp
        class W:
            eos_token_id = EOS; bos_token_id = sp.bos_id(); tokens = pieces; special_token_ids = [0, 1, 2]
            def __call__(self, s): return tokenize(s.decode() if isinstance(s, bytes) else s)
        t, lltok = timeit(lambda: llguidance.LLTokenizer(llguidance.TokenizerWrapper(W())))
        print(f"llguidance {llguidance.__version__ if hasattr(llguidance,'__version__') else ''}: tokenizer {t*1000:.0f} ms")
        bm = lnp.allocate_token_bitmask(1, V)
        def comp(s):
            g = llguidance.LLMatcher.grammar_from_json_schema(s)
            err = llguidance.LLMatcher.validate_grammar(g, lltok)
            if err: raise ValueError(err)
            return g
        def fcheck(s):
            g = llguidance.LLMatcher.grammar_from_json_schema(s); err = llguidance.LLMatcher.validate_grammar(g, lltok)
            return err or None
        report("llguidance", comp, lambda g: llguidance.LLMatcher(lltok, g, log_level=0),
               lambda m: lnp.fill_next_token_bitmask(m, bm), lambda m, t: m.consume_token(t), fcheck)
    if "xgrammar" in which:
        import xgrammar as xgr
        raw = [sp.id_to_piece(i) for i in range(V)]
        t, info = timeit(lambda: xgr.TokenizerInfo(raw, vocab_type=xgr.VocabType.BYTE_FALLBACK, vocab_size=V, stop_token_ids=[EOS], add_prefix_space=True))
        print(f"xgrammar: tokenizer info {t*1000:.0f} ms; torch imported: {'torch' in sys.modules}")
        compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        bm = xgr.allocate_token_bitmask(1, V)
        def fx(s):
            xgr.GrammarCompiler(info, cache_enabled=False).compile_json_schema(json.dumps(s)); return None
        report("xgrammar", lambda s: compiler.compile_json_schema(json.dumps(s)), lambda c: xgr.GrammarMatcher(c),
               lambda m: m.fill_next_token_bitmask(bm), lambda m, t: m.accept_token(t), fx)
    if "outlines-core" in which:
        import outlines_core as oc
        from outlines_core.json_schema import build_regex_from_schema
        vmap = {}
        for i in range(V):
            if i == EOS or sp.is_control(i) or sp.is_unknown(i): continue
            vmap.setdefault(pieces[i], []).append(i)
        t, vocab = timeit(lambda: oc.Vocabulary(EOS, vmap))
        print(f"outlines-core: vocabulary {t*1000:.0f} ms")
        mask = np.zeros(((V + 31) // 32,), dtype=np.int32)
        def fo(s):
            oc.Index(build_regex_from_schema(json.dumps(s)), vocab); return None
        report("outlines-core", lambda s: oc.Index(build_regex_from_schema(json.dumps(s)), vocab), lambda idx: oc.Guide(idx),
               lambda g: g.write_mask_into(mask.ctypes.data, mask.size, 4), lambda g, t: (g.advance(t, return_tokens=False), True)[1], fo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
