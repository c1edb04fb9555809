"""The option tables and the `turbox` config section."""
import pytest
from mmengine.config import Config

from turbox_mm.engine.runner import TURBOX_OPTIONS, apply_turbox_options
from turbox_mm.utils.options import Option, check_options, describe_options

SCHEMA = {
    'report': Option(True, (bool, ), 'log'),
    'workers': Option(2, (int, ), 'count'),
    'mode': Option('fork', (str, ), 'start method', choices=('fork', 'spawn')),
    'loader': {
        'depth': Option(None, (int, type(None)), 'prefetch depth')
    },
}


def test_defaults_filled():
    assert check_options(None, SCHEMA) == {
        'report': True, 'workers': 2, 'mode': 'fork', 'loader': {'depth': None}}
    assert check_options({'loader': {'depth': 4}}, SCHEMA)['loader'] == {'depth': 4}


def test_unknown_key_named_with_valid_keys():
    with pytest.raises(KeyError) as err:
        check_options({'reprot': False}, SCHEMA)
    msg = str(err.value)
    assert "'turbox.reprot'" in msg and "did you mean 'report'" in msg
    assert 'Valid keys of \'turbox\': loader, mode, report, workers' in msg


def test_unknown_nested_key_named_with_full_path():
    with pytest.raises(KeyError, match=r"'turbox\.loader\.dpeth'.*Valid keys of "
                       r"'turbox\.loader': depth"):
        check_options({'loader': {'dpeth': 1}}, SCHEMA)


def test_wrong_type_named():
    with pytest.raises(TypeError, match=r"'turbox.workers' must be int, got str: 'two'"):
        check_options({'workers': 'two'}, SCHEMA)
    # bool is an int subclass, but True is no worker count.
    with pytest.raises(TypeError, match=r"'turbox.workers' must be int, got bool"):
        check_options({'workers': True}, SCHEMA)
    with pytest.raises(TypeError, match=r"'turbox.loader' must be a dict"):
        check_options({'loader': 3}, SCHEMA)


def test_invalid_choice_lists_choices():
    with pytest.raises(ValueError, match=r"'turbox.mode' is 'thread'; valid values: 'fork', "
                       r"'spawn'"):
        check_options({'mode': 'thread'}, SCHEMA)


def test_describe_lists_every_option():
    text = describe_options(TURBOX_OPTIONS)
    for key in ('turbox.report', 'turbox.dataloader.pin_memory', 'turbox.env.mp_start_method'):
        assert key in text


def _cfg(num_workers):
    return Config(dict(
        train_dataloader=dict(num_workers=num_workers, batch_size=2),
        val_dataloader=dict(num_workers=0, batch_size=2),
        test_dataloader=None,
        env_cfg=dict(mp_cfg=dict(mp_start_method='spawn'))))


def test_apply_sets_loader_and_env(monkeypatch):
    monkeypatch.setattr('torch.cuda.is_available', lambda: True)
    cfg = _cfg(num_workers=4)
    opts = check_options({'dataloader': {'prefetch_factor': 4}}, TURBOX_OPTIONS)
    changes = apply_turbox_options(cfg, opts)
    assert cfg.train_dataloader.pin_memory and cfg.train_dataloader.persistent_workers
    assert cfg.train_dataloader.prefetch_factor == 4
    # A loader without workers cannot keep workers alive or prefetch: left alone.
    assert cfg.val_dataloader.pin_memory
    assert 'persistent_workers' not in cfg.val_dataloader
    assert 'prefetch_factor' not in cfg.val_dataloader
    assert cfg.env_cfg.mp_cfg == dict(mp_start_method='fork', opencv_num_threads=0)
    assert 'train_dataloader.persistent_workers = True' in changes
    assert "env_cfg.mp_cfg.mp_start_method = 'fork'" in changes


def test_pin_memory_skipped_with_warning_without_cuda(monkeypatch):
    monkeypatch.setattr('torch.cuda.is_available', lambda: False)
    warnings = []
    monkeypatch.setattr('turbox_mm.engine.runner.turbox_options.print_log',
                        lambda msg, **kw: warnings.append(msg))
    cfg = _cfg(num_workers=2)
    apply_turbox_options(cfg, check_options({}, TURBOX_OPTIONS))
    assert 'pin_memory' not in cfg.train_dataloader
    assert any('train_dataloader keeps pageable memory' in w for w in warnings)


def test_options_off_change_nothing(monkeypatch):
    monkeypatch.setattr('torch.cuda.is_available', lambda: True)
    cfg = _cfg(num_workers=2)
    cfg.env_cfg.mp_cfg = dict(mp_start_method='fork', opencv_num_threads=0)
    opts = check_options(
        {'dataloader': {'pin_memory': False, 'persistent_workers': False},
         'loop': {'pipelined': False}, 'precision': {'tf32': False, 'cudnn_benchmark': False},
         'system': {'cpu_affinity': False, 'gc': False, 'async_log': False,
                    'atomic_checkpoints': False}},
        TURBOX_OPTIONS)
    assert apply_turbox_options(cfg, opts) == []


def test_readme_documents_every_turbox_option(root):
    readme = open(f'{root}/README.md').read()

    def keys(schema, prefix=''):
        for key, spec in schema.items():
            if isinstance(spec, dict):
                yield from keys(spec, f'{prefix}{key}.')
            else:
                yield f'{prefix}{key}'

    missing = [k for k in keys(TURBOX_OPTIONS) if f'| `{k}` |' not in readme]
    assert not missing, f'README.md lacks rows for turbox options: {missing}'


def _leaves(schema, path='turbox'):
    for key, value in schema.items():
        if isinstance(value, dict):
            yield from _leaves(value, f'{path}.{key}')
        else:
            yield f'{path}.{key}', value


def _nested(path, value):
    section = value
    for key in reversed(path.split('.')[1:]):
        section = {key: section}
    return section


@pytest.mark.parametrize('path, option', list(_leaves(TURBOX_OPTIONS)),
                         ids=[p for p, _ in _leaves(TURBOX_OPTIONS)])
def test_every_turbox_key_rejects_a_bad_value_by_name(path, option):
    """Fault injection over the whole `turbox` section: a value of the wrong type, and for
    keys with choices a value outside them, is an error naming the key."""
    # a dict, or for the one option that takes a dict (compile.options), a set: no option
    # takes both
    bad = {'bad': 1} if dict not in option.types else {'bad'}
    assert not isinstance(bad, option.types)
    with pytest.raises(TypeError, match=rf"'{path}' must be"):
        check_options(_nested(path, bad), TURBOX_OPTIONS)
    if option.choices is not None:
        wrong = next(v for v in ('no-such-value', 'x') if v not in option.choices)
        with pytest.raises(ValueError, match=rf"'{path}' is '{wrong}'; valid values"):
            check_options(_nested(path, wrong), TURBOX_OPTIONS)


@pytest.mark.parametrize('section, match', [
    (dict(dataloader=dict(prefetch_factor=0)),
     r"'turbox.dataloader.prefetch_factor' must be None or >= 1"),
    (dict(dataloader=dict(timeout=0)), r"'turbox.dataloader.timeout' must be None or a "
                                       r'number of seconds > 0'),
    (dict(compile=dict(modules=['no_such_part'])), r"'no_such_part' names no submodule"),
])
def test_values_of_the_right_type_but_out_of_range_are_named(section, match):
    cfg = Config(dict(model=dict(type='X', backbone=dict(type='Y')), turbox=section))
    with pytest.raises(ValueError, match=match):
        apply_turbox_options(cfg, check_options(cfg.turbox, TURBOX_OPTIONS))
