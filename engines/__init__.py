"""Engine adapters: vLLM as Ray Serve replicas (``vllm_engine``), the OpenAI ingress
(``openai_app``), ``ray.serve.llm`` wiring (``ray_llm``), the tiny local test model
(``tiny_model``) and the request-body protocol (``protocol``, ``errors``). Importing the
package imports none of vLLM, Ray or torch; see docs/engines.md."""
