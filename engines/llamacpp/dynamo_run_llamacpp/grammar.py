"""A GBNF grammar that accepts one JSON object, for ``response_format: json_object``.

Whitespace runs are bounded so that a small model cannot wander into endless blank space,
and nothing may follow the closing brace except the end-of-sequence token.
"""

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
