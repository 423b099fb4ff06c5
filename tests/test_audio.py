"""Audio: WAV files, log-mel features, the audio_cnn encoder, spoken-tones, audio-folder and
the audio recipe."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from polytask.cli import app
from polytask.data.audio import WaveformScaler, read_wav, resample, tone, write_wav
from polytask.data.bundle import build_bundle
from polytask.data.sources import DATASETS
from polytask.data.sources.modalities import make_speakers
from polytask.errors import ConfigError, DataError
from polytask.models import build_model
from polytask.models.audio import AudioCNNEncoder, hz_to_mel, log_mel, mel_filterbank, mel_to_hz
from polytask.tasks import TaskSpec

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- WAV files
def test_wav_round_trip_16_bit(tmp_path: Path) -> None:
    x = (0.5 * tone(440.0, seconds=0.05, sample_rate=8000)).astype(np.float32)
    write_wav(tmp_path / "a.wav", x, 8000)
    y, rate = read_wav(tmp_path / "a.wav")
    assert rate == 8000 and y.dtype == np.float32 and y.shape == x.shape
    assert np.abs(y - x).max() < 1.0 / 32767 + 1e-6


@pytest.mark.parametrize("width", [1, 3, 4])
def test_wav_other_sample_widths_and_stereo(tmp_path: Path, width: int) -> None:
    # two channels, +half and -half of full scale: the mono mix is 0; the left channel alone
    # (the right one silent) is +0.5
    full = 1 << (8 * width - 1)
    half = full // 2
    if width == 1:  # unsigned 8 bit, 128 = zero
        frames = bytes([128 + half, 128 - half, 128 + half, 128])
    else:
        frames = b"".join(v.to_bytes(width, "little", signed=True) for v in (half, -half, half, 0))
    with wave.open(str(tmp_path / "s.wav"), "wb") as f:
        f.setnchannels(2)
        f.setsampwidth(width)
        f.setframerate(16000)
        f.writeframes(frames)
    y, rate = read_wav(tmp_path / "s.wav")
    assert rate == 16000 and np.allclose(y, [0.0, 0.25], atol=1e-2)


def test_bad_wav_files_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "noise.wav"
    bad.write_bytes(b"this is not a RIFF file at all")
    with pytest.raises(DataError, match=r"noise\.wav: not a readable PCM WAV file"):
        read_wav(bad)
    with pytest.raises(DataError, match=r"absent\.wav: no such audio file"):
        read_wav(tmp_path / "absent.wav")
    good = tmp_path / "cut.wav"
    write_wav(good, np.zeros(1000, dtype=np.float32), 8000)
    data = good.read_bytes()
    good.write_bytes(data[: len(data) - 501])  # drop the end of the samples
    with pytest.raises(DataError, match=r"cut\.wav: truncated WAV file"):
        read_wav(good)


def test_resample_keeps_a_tone() -> None:
    x = tone(200.0, seconds=0.1, sample_rate=16000)
    y = resample(x, 16000, 8000)
    assert len(y) == 800
    np.testing.assert_allclose(y, tone(200.0, seconds=0.1, sample_rate=8000), atol=1e-3)


# ----------------------------------------------------------------------------- log-mel
def test_mel_filterbank_is_triangles_between_mel_points() -> None:
    rate, n_fft, n_mels = 8000, 512, 24
    fb = mel_filterbank(sample_rate=rate, n_fft=n_fft, n_mels=n_mels)
    assert fb.shape == (n_fft // 2 + 1, n_mels) and (fb >= 0).all() and fb.max() <= 1.0
    assert torch.allclose(mel_to_hz(hz_to_mel(torch.tensor([0.0, 440.0, 4000.0]))).float(),
                          torch.tensor([0.0, 440.0, 4000.0]), atol=1e-3)  # fmt: skip
    freqs = torch.linspace(0, rate / 2, n_fft // 2 + 1)
    centres = mel_to_hz(torch.linspace(hz_to_mel(0.0), hz_to_mel(rate / 2), n_mels + 2))[1:-1]
    for m in range(n_mels):  # each filter peaks at the FFT bin nearest its centre frequency
        peak = freqs[fb[:, m].argmax()]
        assert abs(float(peak - centres[m])) <= rate / n_fft
    with pytest.raises(DataError, match="f_min < f_max"):
        mel_filterbank(sample_rate=rate, n_fft=n_fft, n_mels=8, f_max=5000)


@pytest.mark.parametrize("frequency", [300.0, 1000.0, 2500.0])
def test_log_mel_of_a_pure_tone_peaks_at_its_mel_bin(frequency: float) -> None:
    rate, n_fft, n_mels = 16000, 1024, 40
    fb = mel_filterbank(sample_rate=rate, n_fft=n_fft, n_mels=n_mels)
    x = torch.from_numpy(tone(frequency, seconds=0.5, sample_rate=rate))[None]
    spec = log_mel(x, fb, n_fft=n_fft, hop_length=256)
    assert spec.shape == (1, n_mels, 0.5 * rate // 256 + 1)
    centres = mel_to_hz(torch.linspace(hz_to_mel(0.0), hz_to_mel(rate / 2), n_mels + 2))[1:-1]
    expected = int((centres - frequency).abs().argmin())
    assert int(spec[0].mean(dim=1).argmax()) == expected


def test_waveform_scaler_fits_train_rms_and_round_trips() -> None:
    s = WaveformScaler(8000)
    s.fit(np.array([[0.2, -0.2, 0.2, -0.2], [0.0, 0.0, 0.0, 0.0]]))  # silent rows ignored
    assert s.rms == pytest.approx(0.2)
    again = WaveformScaler.from_dict(s.to_dict())
    assert again.transform(np.ones((1, 4))).tolist() == s.transform(np.ones((1, 4))).tolist()
    assert again.spec() == {"sample_rate": 8000}


# ----------------------------------------------------------------------------- encoder
SPEC = {"audio": {"shape": [4000], "sample_rate": 8000}}


def test_audio_cnn_shape_gradient_and_train_only_masks() -> None:
    torch.manual_seed(0)
    enc = AudioCNNEncoder(SPEC, channels=(4, 8), out_features=12, freq_mask=6, time_mask=6)
    x = {"audio": torch.randn(3, 4000)}
    out = enc(x)
    assert out.shape == (3, 12) and enc.out_features == 12
    out.sum().backward()
    assert all(p.grad is not None for p in enc.parameters())
    enc.eval()
    assert torch.equal(enc(x), enc(x))  # no SpecAugment in evaluation mode
    spec = torch.ones(4, 40, 30)
    masked = enc._spec_augment(spec)
    assert masked.shape == spec.shape and masked.sum() <= spec.sum()


def test_audio_cnn_on_a_plain_waveform_tensor_needs_a_sample_rate() -> None:
    enc = AudioCNNEncoder((2000,), sample_rate=8000, channels=(4,), out_features=8)
    assert enc(torch.randn(2, 2000)).shape == (2, 8)
    with pytest.raises(ConfigError, match="unknown sample rate"):
        AudioCNNEncoder((2000,))
    with pytest.raises(ConfigError, match="shorter than half the FFT window"):
        AudioCNNEncoder((100,), sample_rate=16000)


@pytest.mark.parametrize("architecture", ["hard_sharing", "mmoe", "ple"])
def test_audio_cnn_in_shared_architectures(architecture: str) -> None:
    tasks = [
        TaskSpec("d", "multiclass", num_classes=10),
        TaskSpec("s", "multiclass", num_classes=3),
    ]
    model = build_model(
        tasks,
        SPEC,
        encoder="audio_cnn",
        encoder_params={"channels": [4], "out_features": 8},
        architecture=architecture,
    )
    out = model({"audio": torch.randn(4, 4000)})
    assert out.outputs["d"].shape == (4, 10)
    sum(o.sum() for o in out.outputs.values()).backward()
    assert all(p.grad is not None for p in model.shared_parameters())


# ----------------------------------------------------------------------------- datasets
def test_spoken_tones_is_deterministic_by_seed() -> None:
    a = DATASETS.get("spoken-tones")(seed=2, num_samples=40)
    b = DATASETS.get("spoken-tones")(seed=2, num_samples=40)
    c = DATASETS.get("spoken-tones")(seed=3, num_samples=40)
    np.testing.assert_array_equal(a.inputs["audio"], b.inputs["audio"])
    assert not np.array_equal(a.inputs["audio"], c.inputs["audio"])
    for name in ("digit", "speaker"):
        np.testing.assert_array_equal(a.targets[name], b.targets[name])
    assert a.inputs["audio"].shape == (40, 4000) and a.inputs["audio"].dtype == np.float32
    bundle = build_bundle(a, seed=0)
    assert bundle.input_shape == {"audio": {"shape": [4000], "sample_rate": 8000}}


def test_spoken_tones_speakers_differ_in_pitch() -> None:
    # the generated pitch shows in the spectrum: the lowest voice's energy lies lower
    voices = make_speakers(4, seed=0)
    assert voices.f0.min() < 110 and voices.f0.max() > 200
    table = DATASETS.get("spoken-tones")(seed=0, num_samples=80, num_speakers=4, snr_db=40)
    spectra = np.abs(np.fft.rfft(table.inputs["audio"], axis=1))
    freqs = np.fft.rfftfreq(4000, 1 / 8000)
    low_band = spectra[:, (freqs > 60) & (freqs < 300)].sum(axis=1) / spectra.sum(axis=1)
    speakers = table.targets["speaker"]
    low, high = int(np.argmin(voices.f0)), int(np.argmax(voices.f0))
    assert low_band[speakers == low].mean() > low_band[speakers == high].mean()


def test_audio_folder_reads_wav_files_and_names_a_bad_one(tmp_path: Path) -> None:
    rows = []
    for i in range(6):
        write_wav(
            tmp_path / f"clip{i}.wav",
            0.3 * tone(200 + 100 * i, seconds=0.1 + 0.02 * i, sample_rate=16000),
            16000,
        )
        rows.append(f"clip{i}.wav,{i % 2},{'' if i == 5 else i % 3}")
    (tmp_path / "labels.csv").write_text("file,loud,kind\n" + "\n".join(rows) + "\n")
    tasks = [
        {"name": "loud", "kind": "binary"},
        {"name": "kind", "kind": "multiclass", "num_classes": 3},
    ]
    table = DATASETS.get("audio-folder")(seed=0, path=str(tmp_path), tasks=tasks, sample_rate=8000)
    assert table.inputs["audio"].shape == (6, round(0.2 * 8000))  # the longest clip
    assert table.targets["kind"].tolist() == [0, 1, 2, 0, 1, -1]
    (tmp_path / "clip3.wav").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"clip3\.wav: not a readable PCM WAV file"):
        DATASETS.get("audio-folder")(seed=0, path=str(tmp_path), tasks=tasks)


# ----------------------------------------------------------------------------- recipe
def test_audio_recipe_trains_one_tiny_epoch(tmp_path: Path) -> None:
    raw = yaml.safe_load((ROOT / "configs" / "audio-two-task.yaml").read_text())
    raw["data"]["params"]["num_samples"] = 120
    raw["train"] = {**raw["train"], "epochs": 1, "progress": False}
    raw["output_dir"] = str(tmp_path)
    path = tmp_path / "audio.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["train", str(path), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "audio-two-task" / "checkpoints" / "best.safetensors").is_file()
