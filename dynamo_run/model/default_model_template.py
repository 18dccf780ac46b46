"""Tool calling for the built-in default model, as Ollama's library adds it per model.

SmolLM2-135M-Instruct's own chat template ignores ``tools``. Its card therefore gets a
template with a Hermes-style tool branch (tools listed in the system turn, calls answered as
``<tool_call>{...}</tool_call>``, results as ``<tool_response>``) used only when a request
carries tools or tool turns; every other conversation renders through the model's own
template unchanged. ``<tool_call>`` in it makes the hermes parser the detected one.
"""

from __future__ import annotations

_TOOL_BRANCH = """\
{%- set ns = namespace(tooly=(tools is defined and tools is not none and tools | length > 0)) -%}
{%- for message in messages -%}
{%- if message.role == 'tool' or message.tool_calls -%}{%- set ns.tooly = true -%}{%- endif -%}
{%- endfor -%}
{%- if ns.tooly -%}
<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}{% else %}\
You are a helpful AI assistant named SmolLM, trained by Hugging Face{% endif %}
{%- if tools %}

You may call functions. They are described in <tools></tools>:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
To call one, answer with <tool_call>{"name": NAME, "arguments": {ARGUMENTS}}</tool_call>.
{%- endif %}<|im_end|>
{% for message in messages -%}
{%- if message.role == 'assistant' and message.tool_calls -%}
<|im_start|>assistant
{% if message.content %}{{ message.content }}
{% endif %}
{%- for call in message.tool_calls -%}
<tool_call>{"name": {{ call.function.name | tojson }}, \
"arguments": {{ call.function.arguments | tojson }}}</tool_call>
{% endfor -%}
<|im_end|>
{% elif message.role == 'tool' -%}
<|im_start|>user
<tool_response>{{ message.content }}</tool_response><|im_end|>
{% elif message.role != 'system' -%}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif -%}
{%- else -%}
"""


def with_tool_branch(own_template: str) -> str:
    """The default model's template: the tool branch above, else the model's own."""
    return _TOOL_BRANCH + own_template + "{%- endif -%}"
