"""Using a trained model: `rlhfkit generate` (batched generation over a prompt file), `rlhfkit chat`
(terminal chat, streaming, optionally two models side by side) and `rlhfkit webchat` (the same in a
local gradio page). All load models with `rlhfkit.models.load.load_for_use`."""
