"""multipart/form-data bodies and audio headers, as speech-to-text requests carry them."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policyd import http_api
from policyd.audio import wav_seconds
from policyd.multipart import MultipartError, MultipartForm
from tests.helpers import wav


def _form(fields: dict[str, str], audio: bytes, filename: str = "a.wav") -> tuple[str, bytes]:
    """The content type and body httpx (the openai SDK's transport) writes for these fields and file."""
    request = httpx.Request("POST", "http://x/v1/audio/transcriptions", data=fields,
                            files={"file": (filename, audio, "audio/wav")})
    return request.headers["content-type"], request.read()


@settings(max_examples=200, deadline=None)
@given(fields=st.dictionaries(st.sampled_from(["model", "prompt", "language", "response_format", "stream"]),
                              st.text(max_size=40), min_size=1),
       audio=st.binary(max_size=2000), model=st.text(min_size=1, max_size=30))
def test_a_form_reads_back_what_was_sent_and_rewrites_only_its_model(fields: dict[str, str], audio: bytes,
                                                                      model: str) -> None:
    content_type, body = _form(fields, audio or b"\x00")
    form = MultipartForm.parse(body, MultipartForm.boundary_of(content_type))
    assert {name: form.field(name) for name in fields} == fields
    assert form.file("file").content == (audio or b"\x00") and form.file("file").filename == "a.wav"
    assert form.encoded() == body  # written again byte for byte
    again = MultipartForm.parse(form.with_field("model", model).encoded(), form.boundary.decode())
    assert again.field("model") == model  # replaced, or added when the form had none
    assert {n: again.field(n) for n in fields if n != "model"} == {n: v for n, v in fields.items() if n != "model"}
    assert again.file("file").content == (audio or b"\x00")


def test_what_is_not_a_form_is_refused() -> None:
    assert MultipartForm.boundary_of("application/json") is None
    assert MultipartForm.boundary_of('multipart/form-data; boundary="a b"') == "a b"
    for body in (b"", b"--b\r\nno headers end", b'--b\r\ncontent-disposition: form-data; name="x"\r\n\r\nno end',
                 b"--bXX", b'--b\r\ncontent-disposition: form-data\r\n\r\nv\r\n--b--'):
        with pytest.raises(MultipartError):
            MultipartForm.parse(body, "b")


def test_a_wav_header_tells_its_seconds_rounded_up() -> None:
    assert wav_seconds(wav(7)) == 7
    assert wav_seconds(wav(1, rate=16000)[:-1]) == 1  # a file cut short: what it holds, rounded up
    assert wav_seconds(wav(3)[:44 + 8000]) == 1
    assert wav_seconds(b"ID3" + bytes(1000)) == wav_seconds(b"RIFF") == wav_seconds(wav(2)[:30]) == 0


def test_speech_to_text_requests_are_understood_or_refused_clearly() -> None:
    content_type, body = _form({"model": "whisper-1", "prompt": "names"}, wav(4))
    call = http_api.parse_call("POST", "/v1/audio/transcriptions", {"content-type": content_type}, body)
    assert (call.problem, call.endpoint, call.model, call.seconds, call.audio_bytes, call.prompt_bytes) == (
        "", "audio_transcriptions", "whisper-1", 4, 0, 5)
    content_type, body = _form({"model": "gpt-4o-transcribe", "stream": "true"}, b"OggS" + bytes(999), "a.ogg")
    call = http_api.parse_call("POST", "/v1/audio/translations", {"content-type": content_type}, body)
    assert (call.stream, call.seconds, call.audio_bytes) == (True, 0, 1003)
    azure = http_api.parse_call("POST", "/openai/deployments/whisper-1/audio/transcriptions?api-version=x",
                                {"content-type": content_type}, body)
    assert (azure.model, azure.model_in_path) == ("whisper-1", True)
    modelless_type, modelless = _form({"language": "en"}, wav(1))
    for headers, sent, param in (({"content-type": "application/json"}, b'{"model": "whisper-1"}', ""),
                                 ({"content-type": content_type}, body.replace(b'name="file"', b'name="audio"'), "file"),
                                 ({"content-type": modelless_type}, modelless, "model")):
        call = http_api.parse_call("POST", "/v1/audio/transcriptions", headers, sent)
        assert (call.problem, call.problem_param) == ("invalid_request", param)
