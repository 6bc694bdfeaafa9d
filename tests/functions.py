"""Two functions in OpenAI's tool format, for the tool-call tests (tests/models/test_tool_calls.py,
tests/integration/test_server.py). Strings are bounded so that a reply drawn from random scores
under their grammar ends."""

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a timezone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 30}}, "required": ["tz"],
                   "additionalProperties": False}}}
