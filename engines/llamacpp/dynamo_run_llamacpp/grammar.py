"""GBNF grammars for guided decoding: one JSON object (``response_format: json_object``),
and JSON matching a schema (``json_schema``, forced tool calls).

Whitespace runs are bounded so that a small model cannot wander into endless blank space,
and nothing may follow the closing brace except the end-of-sequence token.
"""

from __future__ import annotations

import json
from functools import lru_cache

JSON_OBJECT_GBNF = r"""
root     ::= object
value    ::= object | array | string | number | "true" | "false" | "null"
object   ::= "{" ws ( member ( "," ws member )* )? "}"
member   ::= string ws ":" ws value ws
array    ::= "[" ws ( element ( "," ws element )* )? "]"
element  ::= value ws
string   ::= "\"" char* "\""
char     ::= [^"\\\x7F\x00-\x1F] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F]{4} )
number   ::= "-"? ( "0" | [1-9] [0-9]{0,15} ) ( "." [0-9]{1,16} )? ( [eE] [-+]? [0-9]{1,3} )?
ws       ::= [ \t\n]{0,8}
"""


class SchemaError(ValueError):
    """A JSON schema llama.cpp's converter cannot turn into a grammar."""


# llama-cpp-python's converter lets raw control characters into strings, which JSON forbids;
# its string character rule is swapped for this one (the JSON_OBJECT_GBNF ``char`` above).
_LOOSE_CHAR = 'char ::= [^"\\\\] | '
_STRICT_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] | '


@lru_cache(maxsize=256)
def _schema_gbnf(canonical: str) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        grammar = json_schema_to_gbnf(canonical)
    except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise SchemaError(str(exc) or type(exc).__name__) from None
    return grammar.replace(_LOOSE_CHAR, _STRICT_CHAR)


def schema_grammar(schema: dict) -> str:
    """The GBNF grammar (root rule ``root``) of JSON matching ``schema``, converted by
    llama-cpp-python's own JSON-schema-to-grammar and cached: requests reusing a schema
    (a tool's parameters, an app's response format) skip the conversion."""
    try:
        canonical = json.dumps(schema, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"not JSON: {exc}") from None
    return _schema_gbnf(canonical)
