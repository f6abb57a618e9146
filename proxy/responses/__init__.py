"""The Responses API (``/v1/responses``): translation to and from chat completions, the stream of Responses events,
the store behind ``previous_response_id``, and the bridged and native paths, both supervised like chat."""
