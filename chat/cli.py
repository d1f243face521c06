"""``internvl-fm chat`` (one-shot or interactive) and ``internvl-fm serve-chat`` (OpenAI-compatible server)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["chat_main", "serve_main"]


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="InternVL-Chat checkpoint folder or hub id")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the checkpoint folder)")
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float32, float16 or auto")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda if available)")
    parser.add_argument("--device-map", default=None, choices=["auto"],
                        help="split over all GPUs like the model cards (needs accelerate)")
    parser.add_argument("--load-in-8bit", action="store_true", help="int8 LLM weights (bitsandbytes, CUDA)")
    parser.add_argument("--max-num", type=int, default=None, help="max tiles per image (default: config)")


def _load(args: argparse.Namespace):
    import torch

    from .modeling import InternVLChatModel
    from .tokenizer import load_tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = InternVLChatModel.from_pretrained(args.model, dtype=args.dtype, device=None if args.device_map else device,
                                              device_map=args.device_map, load_in_8bit=args.load_in_8bit)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else model.tokenizer
    if tokenizer is None:
        raise SystemExit(f"no tokenizer found in {args.model}; pass --tokenizer")
    return model, tokenizer


def _images_to_pixels(model, paths: list[str], max_num: int | None):
    import torch

    from .tiling import load_image

    if not paths:
        return None, []
    config = model.config
    tiles = [load_image(p, max_num=max_num or config.max_dynamic_patch, input_size=config.image_size,
                        min_num=config.min_dynamic_patch, use_thumbnail=config.use_thumbnail) for p in paths]
    return torch.cat(tiles).to(device=model.device, dtype=model.dtype), [t.shape[0] for t in tiles]


def _video_to_pixels(model, path: str, num_segments: int, max_num: int):
    from .video import load_video

    clip = load_video(path, input_size=model.config.image_size, max_num=max_num, num_segments=num_segments)
    return clip.pixel_values.to(device=model.device, dtype=model.dtype), clip.num_patches_list, clip.prompt_prefix


def _answer(model, tokenizer, pixel_values, question: str, generation: dict[str, Any], history, num_patches,
            stream: bool) -> str:
    if stream:
        pieces = []
        for piece in model.stream_chat(tokenizer, pixel_values, question, generation, history=history,
                                       num_patches_list=num_patches or None):
            print(piece, end="", flush=True)
            pieces.append(piece)
        print()
        return "".join(pieces)
    answer = model.chat(tokenizer, pixel_values, question, generation, history=history,
                        num_patches_list=num_patches or None)
    print(answer)
    return answer


def _image_prefix(num_images: int) -> str:
    if num_images <= 1:
        return "<image>\n" if num_images else ""
    return "".join(f"Image-{i + 1}: <image>\n" for i in range(num_images))


def _save_boxes(answer: str, image_path: str | None, out: str | None) -> None:
    if not out:
        return
    from PIL import Image

    from .grounding import draw_boxes, ground

    if image_path is None:
        print("--boxes-out needs an --image", file=sys.stderr)
        return
    image = Image.open(image_path)
    boxes = ground(answer, image.width, image.height)
    if not boxes:
        print("the answer holds no <box> to draw", file=sys.stderr)
        return
    from internvl_fm.loading import atomic_write

    with atomic_write(out) as tmp:
        draw_boxes(image, boxes).save(tmp, format=Path(out).suffix.lstrip(".").upper().replace("JPG", "JPEG") or "PNG")
    print(f"drew {len(boxes)} box(es) to {out}", file=sys.stderr)


def chat_main(argv: list[str]) -> int:
    """Chat with an InternVL-Chat model: one question (``-q``) or an interactive session."""
    parser = argparse.ArgumentParser(prog="internvl-fm chat", description=chat_main.__doc__)
    _add_model_args(parser)
    parser.add_argument("-q", "--question", help="ask one question and exit (default: interactive)")
    parser.add_argument("-i", "--image", action="append", default=[], help="image file (repeat for several)")
    parser.add_argument("--video", help="video file (frames sampled with the official get_index; needs av)")
    parser.add_argument("--num-segments", type=int, default=8, help="video frames to sample")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--system", help="system message (default: the template's)")
    parser.add_argument("--no-stream", action="store_true", help="print the answer at the end, not token by token")
    parser.add_argument("--boxes-out", help="draw <box> answers on the first image into this file")
    args = parser.parse_args(argv)
    if args.image and args.video:
        parser.error("use --image or --video, not both")

    model, tokenizer = _load(args)
    if args.system is not None:
        model.system_message = args.system
    generation: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": args.temperature > 0}
    if args.temperature > 0:
        generation["temperature"] = args.temperature
    if args.video:
        pixel_values, num_patches, prefix = _video_to_pixels(model, args.video, args.num_segments, args.max_num or 1)
    else:
        pixel_values, num_patches = _images_to_pixels(model, args.image, args.max_num)
        prefix = _image_prefix(len(num_patches))
    stream = not args.no_stream

    if args.question is not None:
        answer = _answer(model, tokenizer, pixel_values, prefix + args.question, generation, [], num_patches, stream)
        _save_boxes(answer, args.image[0] if args.image else None, args.boxes_out)
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
        question = (prefix if not history else "") + line
        # the images stay attached: every turn re-expands the <image> of the first question, as the official chat()
        answer = _answer(model, tokenizer, pixel_values, question, generation, history, num_patches, stream)
        history.append((question, answer))


def serve_main(argv: list[str]) -> int:
    """Serve an InternVL-Chat model with an OpenAI-compatible API (/v1/chat/completions, /v1/models)."""
    from .server import ServerSettings, serve

    parser = argparse.ArgumentParser(prog="internvl-fm serve-chat", description=serve_main.__doc__)
    _add_model_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: local only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", default=None, help="model id clients must send (default: folder name)")
    parser.add_argument("--allowed-root", help="local image files must be under this folder (default: none allowed)")
    parser.add_argument("--allow-http", action="store_true", help="let clients pass http(s) image URLs")
    parser.add_argument("--max-images", type=int, default=8)
    parser.add_argument("--max-image-pixels", type=int, default=4096 * 4096)
    parser.add_argument("--max-request-bytes", type=int, default=20 * 1024 * 1024)
    parser.add_argument("--max-new-tokens", type=int, default=1024, help="cap on max_tokens")
    args = parser.parse_args(argv)

    model, tokenizer = _load(args)
    settings = ServerSettings(
        model_name=args.model_name or Path(str(args.model).rstrip("/")).name,
        allowed_root=Path(args.allowed_root).resolve() if args.allowed_root else None,
        allow_http=args.allow_http, max_images=args.max_images, max_image_pixels=args.max_image_pixels,
        max_request_bytes=args.max_request_bytes, max_new_tokens=args.max_new_tokens, max_tiles=args.max_num)
    serve(model, tokenizer, host=args.host, port=args.port, settings=settings)
    return 0
