"""``internvl-fm chat`` (one-shot or interactive) and ``internvl-fm serve-chat`` (OpenAI-compatible server)."""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any

from internvl_fm.chat_templates import IMAGE_PLACEHOLDER, with_image_placeholders
from internvl_fm.cli_utils import CLIError, add_model_options, dtype_or_none, new_parser, resolve_device
from internvl_fm.quantization import add_quantization_option

__all__ = ["chat_main", "serve_main"]


MODEL_HELP = "InternVL-Chat checkpoint folder or Hugging Face hub id (e.g. OpenGVLab/InternVL2-2B)"


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    # MODEL is positional (`internvl-fm chat MODEL`); --model, the name other commands use, works too
    parser.add_argument("model", nargs="?", metavar="MODEL", default=argparse.SUPPRESS, help=MODEL_HELP)
    parser.add_argument("--model", dest="model_option", metavar="MODEL", default=argparse.SUPPRESS,
                        help="same as the positional MODEL")
    parser.add_argument("--tokenizer", help="tokenizer folder or hub id (None: the checkpoint's own)")
    add_model_options(parser, dtype="bfloat16")
    parser.add_argument("--device-map", default=None, choices=["auto"],
                        help="split over all GPUs like the model cards (needs accelerate)")
    parser.add_argument("--load-in-8bit", action="store_true", help="int8 LLM weights (bitsandbytes, CUDA)")
    add_quantization_option(parser)
    parser.add_argument("--max-num", type=int, default=None,
                        help="max tiles per image (None: the config's max_dynamic_patch)")


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse, take MODEL from the positional or `--model`, and check what can be checked before loading."""
    args = parser.parse_args(argv)
    model, option = getattr(args, "model", None), getattr(args, "model_option", None)
    if model and option and model != option:
        parser.error("give MODEL once: positional or --model")
    args.model = model or option
    if not args.model:
        parser.error("MODEL is required (a checkpoint folder or hub id)")
    args.device = resolve_device(args.device)
    if args.load_in_8bit and args.quantization != "none":
        raise CLIError("--load-in-8bit (bitsandbytes) and --quantization (torchao) both quantise: pick one")
    if args.load_in_8bit and args.device_map:
        raise CLIError("--load-in-8bit loads the model on one GPU: drop --device-map")
    if args.load_in_8bit and not args.device.startswith("cuda"):
        raise CLIError(f"--load-in-8bit needs a CUDA --device (bitsandbytes int8 kernels), got {args.device}")
    if args.max_num is not None and args.max_num < 1:
        parser.error(f"--max-num must be >= 1, got {args.max_num}")
    return args


def _load(args: argparse.Namespace):
    from internvl_fm.models.modeling_internvl_chat import InternVLChatModel
    from internvl_fm.tokenization_internvl_chat import load_tokenizer

    model = InternVLChatModel.from_pretrained(args.model, dtype=dtype_or_none(args.dtype),
                                              device=None if args.device_map else args.device,
                                              device_map=args.device_map, load_in_8bit=args.load_in_8bit,
                                              quantization=args.quantization)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else model.tokenizer
    if tokenizer is None:
        raise CLIError(f"no tokenizer found in {args.model}; pass --tokenizer FOLDER")
    return model, tokenizer


def _pixels(model, tokenizer, args: argparse.Namespace):
    """``(pixel_values on the model's device, tiles per image / frame, prompt prefix)`` of ``--image`` / ``--video``,
    made by the model's processor."""
    processor = model.get_processor(tokenizer)
    if args.video:
        clip = processor.load_video(args.video, num_segments=args.num_segments, max_num=args.max_num or 1)
        pixel_values, num_patches, prefix = clip.pixel_values, clip.num_patches_list, clip.prompt_prefix
    else:
        pixel_values, num_patches = processor.preprocess_images(args.image, max_num=args.max_num)
        prefix = with_image_placeholders("", len(num_patches))
    if pixel_values is not None:
        pixel_values = pixel_values.to(device=model.device, dtype=model.dtype)
    return pixel_values, num_patches, prefix


def _answer(model, tokenizer, pixel_values, question: str, generation: dict[str, Any], history, num_patches,
            stream: bool, system_message: str | None) -> str:
    kwargs = dict(history=history, num_patches_list=num_patches or None, system_message=system_message)
    if stream:
        pieces = []
        for piece in model.stream_chat(tokenizer, pixel_values, question, generation, **kwargs):
            print(piece, end="", flush=True)
            pieces.append(piece)
        print()
        return "".join(pieces)
    answer = model.chat(tokenizer, pixel_values, question, generation, **kwargs)
    print(answer)
    return answer


def _image_format_known(path: str) -> bool:
    from PIL import Image

    return Path(path).suffix.lower() in Image.registered_extensions()


def _save_boxes(answer: str, image_path: str, out: str) -> None:
    from PIL import Image

    from .grounding import draw_boxes, ground

    image = Image.open(image_path)
    boxes = ground(answer, image.width, image.height)
    if not boxes:
        print("the answer holds no <box> to draw", file=sys.stderr)
        return
    from internvl_fm.loading import atomic_write

    with atomic_write(out) as tmp:
        draw_boxes(image, boxes).save(tmp, format=Image.registered_extensions()[Path(out).suffix.lower()])
    print(f"drew {len(boxes)} box(es) to {out}", file=sys.stderr)


def chat_main(argv: list[str]) -> int:
    """Chat with an InternVL-Chat model: one question (``-q``) or an interactive session."""
    parser = new_parser("internvl-fm chat", chat_main.__doc__)
    _add_model_args(parser)
    parser.add_argument("-q", "--question", help="ask one question and exit (None: interactive session)")
    parser.add_argument("-i", "--image", action="append", default=[], help="image file (repeat for several)")
    parser.add_argument("--video", help="video file (frames sampled with the official get_index; needs av)")
    parser.add_argument("--num-segments", type=int, default=8, help="video frames to sample")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="tokens to generate at most per answer")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    parser.add_argument("--system", help="system message (None: the template's)")
    parser.add_argument("--no-stream", action="store_true", help="print the answer at the end, not token by token")
    parser.add_argument("--boxes-out", help="draw <box> answers on the first image into this file")
    args = _parse(parser, argv)
    if args.image and args.video:
        parser.error("use --image or --video, not both")
    if args.boxes_out and not args.image:
        parser.error("--boxes-out needs an --image")
    if args.boxes_out and not _image_format_known(args.boxes_out):
        parser.error(f"--boxes-out {args.boxes_out}: use an image file name (.png, .jpg...)")
    if args.num_segments < 1 or args.max_new_tokens < 1 or args.temperature < 0:
        parser.error("--num-segments and --max-new-tokens must be >= 1, --temperature >= 0")
    for path in [*args.image, *([args.video] if args.video else [])]:
        if not Path(path).is_file():
            raise CLIError(f"file not found: {path}")
    if args.video and importlib.util.find_spec("av") is None:
        raise CLIError("--video needs PyAV: pip install av (or pip install 'internvl-fm[video]')")

    model, tokenizer = _load(args)
    generation: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": args.temperature > 0}
    if args.temperature > 0:
        generation["temperature"] = args.temperature
    pixel_values, num_patches, prefix = _pixels(model, tokenizer, args)
    stream = not args.no_stream

    def turn(question: str, history: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Answer one question (printed); the history with it. The media go before the first question."""
        if not history and IMAGE_PLACEHOLDER not in question:
            question = prefix + question
        answer = _answer(model, tokenizer, pixel_values, question, generation, history, num_patches, stream,
                         args.system)
        return [*history, (question, answer)]

    if args.question is not None:
        answer = turn(args.question, [])[-1][1]
        if args.boxes_out:
            _save_boxes(answer, args.image[0], args.boxes_out)
        return 0

    print("interactive chat: /reset clears the history, /quit exits", file=sys.stderr)
    history: list[tuple[str, str]] = []
    while True:
        try:
            line = input(">>> " if sys.stdin.isatty() else "").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            history = []
            continue
        # the images stay attached: every turn re-expands the <image> of the first question, as the official chat()
        history = turn(line, history)


def serve_main(argv: list[str]) -> int:
    """Serve an InternVL-Chat model with an OpenAI-compatible API (/v1/chat/completions, /v1/models)."""
    from .server import ServerSettings, serve

    parser = new_parser("internvl-fm serve-chat", serve_main.__doc__)
    _add_model_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port")
    parser.add_argument("--model-name", default=None, help="model id clients must send (None: the folder name)")
    parser.add_argument("--allowed-root", help="local image files must be under this folder (None: no local files)")
    parser.add_argument("--allow-http", action="store_true", help="let clients pass http(s) image URLs")
    parser.add_argument("--max-images", type=int, default=8, help="images per request at most")
    parser.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="pixels per image at most")
    parser.add_argument("--max-request-bytes", type=int, default=20 * 1024 * 1024, help="request body size at most")
    parser.add_argument("--max-new-tokens", type=int, default=1024, help="cap on a request's max_tokens")
    parser.add_argument("--max-prompt-tokens", type=int, default=None,
                        help="prompt tokens per request at most, images included (None: the LLM's context length)")
    parser.add_argument("--request-timeout", type=float, default=300.0,
                        help="seconds a request may take from arrival, queue included; then its answer is cut")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting at most (more: 429)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="queued requests answered together by one generate call (1: one after another)")
    parser.add_argument("--stall-timeout", type=float, default=60.0,
                        help="/health answers 503 when the generator made no progress for this many seconds")
    parser.add_argument("--shutdown-grace", type=float, default=10.0,
                        help="on SIGTERM, seconds the requests in flight get to finish")
    args = _parse(parser, argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    if args.allowed_root and not Path(args.allowed_root).is_dir():
        raise CLIError(f"--allowed-root is not a folder: {args.allowed_root}")
    try:  # the settings validate themselves, before the model loads
        settings = ServerSettings(
            model_name=args.model_name or Path(str(args.model).rstrip("/")).name,
            allowed_root=Path(args.allowed_root).resolve() if args.allowed_root else None,
            allow_http=args.allow_http, max_images=args.max_images, max_image_pixels=args.max_image_pixels,
            max_request_bytes=args.max_request_bytes, max_new_tokens=args.max_new_tokens, max_tiles=args.max_num,
            max_prompt_tokens=args.max_prompt_tokens, request_timeout_s=args.request_timeout,
            max_queue=args.max_queue, max_batch_size=args.batch_size, stall_timeout_s=args.stall_timeout,
            shutdown_grace_s=args.shutdown_grace)
    except ValueError as exc:
        parser.error(str(exc))

    model, tokenizer = _load(args)
    serve(model, tokenizer, host=args.host, port=args.port, settings=settings)
    return 0
