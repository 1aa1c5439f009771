"""The wire codecs of the main channel (private; import the names from here).

General layout: :mod:`.savevm` has the savevm stream constants, encoders and the
decoded events; :mod:`.vfio` the VFIO payload markers inside each section;
:mod:`.decoder` the sans-IO main-stream decoder; :mod:`.return_path` the
return-path codec (destination to source). :mod:`.buffer` is the input buffer
both decoders share. Everything is pure and synchronous; the protocol rules
(what is legal when) are :mod:`migrator._protocol`'s, not these codecs'.
"""

from __future__ import annotations

from migrator._wire.decoder import (
    DecoderState as DecoderState,
)
from migrator._wire.decoder import (
    MainStreamDecoder as MainStreamDecoder,
)
from migrator._wire.return_path import (
    ReturnPathDecoder as ReturnPathDecoder,
)
from migrator._wire.return_path import (
    RpEvent as RpEvent,
)
from migrator._wire.return_path import (
    RpMsg as RpMsg,
)
from migrator._wire.return_path import (
    encode_rp_message as encode_rp_message,
)
from migrator._wire.return_path import (
    encode_rp_shut as encode_rp_shut,
)
from migrator._wire.return_path import (
    encode_rp_switchover_ack as encode_rp_switchover_ack,
)
from migrator._wire.return_path import (
    rp_is_switchover_ack as rp_is_switchover_ack,
)
from migrator._wire.return_path import (
    rp_shut_status as rp_shut_status,
)
from migrator._wire.savevm import (
    MAX_CONFIG_CAPABILITIES as MAX_CONFIG_CAPABILITIES,
)
from migrator._wire.savevm import (
    MAX_MACHINE_NAME_BYTES as MAX_MACHINE_NAME_BYTES,
)
from migrator._wire.savevm import (
    MIG_CMD_OPEN_RETURN_PATH as MIG_CMD_OPEN_RETURN_PATH,
)
from migrator._wire.savevm import (
    MIG_CMD_PING as MIG_CMD_PING,
)
from migrator._wire.savevm import (
    MIG_CMD_SWITCHOVER_START as MIG_CMD_SWITCHOVER_START,
)
from migrator._wire.savevm import (
    NEED_DATA as NEED_DATA,
)
from migrator._wire.savevm import (
    QEMU_VM_COMMAND as QEMU_VM_COMMAND,
)
from migrator._wire.savevm import (
    QEMU_VM_CONFIGURATION as QEMU_VM_CONFIGURATION,
)
from migrator._wire.savevm import (
    QEMU_VM_EOF as QEMU_VM_EOF,
)
from migrator._wire.savevm import (
    QEMU_VM_FILE_MAGIC as QEMU_VM_FILE_MAGIC,
)
from migrator._wire.savevm import (
    QEMU_VM_FILE_VERSION as QEMU_VM_FILE_VERSION,
)
from migrator._wire.savevm import (
    QEMU_VM_SECTION_END as QEMU_VM_SECTION_END,
)
from migrator._wire.savevm import (
    QEMU_VM_SECTION_FOOTER as QEMU_VM_SECTION_FOOTER,
)
from migrator._wire.savevm import (
    QEMU_VM_SECTION_FULL as QEMU_VM_SECTION_FULL,
)
from migrator._wire.savevm import (
    QEMU_VM_SECTION_PART as QEMU_VM_SECTION_PART,
)
from migrator._wire.savevm import (
    QEMU_VM_SECTION_START as QEMU_VM_SECTION_START,
)
from migrator._wire.savevm import (
    QEMU_VM_SUBSECTION as QEMU_VM_SUBSECTION,
)
from migrator._wire.savevm import (
    QEMU_VM_VMDESCRIPTION as QEMU_VM_VMDESCRIPTION,
)
from migrator._wire.savevm import (
    Command as Command,
)
from migrator._wire.savevm import (
    ConfigBlob as ConfigBlob,
)
from migrator._wire.savevm import (
    Configuration as Configuration,
)
from migrator._wire.savevm import (
    DataChunk as DataChunk,
)
from migrator._wire.savevm import (
    DataHeader as DataHeader,
)
from migrator._wire.savevm import (
    EndOfFile as EndOfFile,
)
from migrator._wire.savevm import (
    Event as Event,
)
from migrator._wire.savevm import (
    FileHeader as FileHeader,
)
from migrator._wire.savevm import (
    MarkerEvent as MarkerEvent,
)
from migrator._wire.savevm import (
    NeedData as NeedData,
)
from migrator._wire.savevm import (
    SectionEnd as SectionEnd,
)
from migrator._wire.savevm import (
    SectionFooter as SectionFooter,
)
from migrator._wire.savevm import (
    SectionFull as SectionFull,
)
from migrator._wire.savevm import (
    SectionPart as SectionPart,
)
from migrator._wire.savevm import (
    SectionStart as SectionStart,
)
from migrator._wire.savevm import (
    VmDescription as VmDescription,
)
from migrator._wire.savevm import (
    encode_command as encode_command,
)
from migrator._wire.savevm import (
    encode_configuration as encode_configuration,
)
from migrator._wire.savevm import (
    encode_eof as encode_eof,
)
from migrator._wire.savevm import (
    encode_file_header as encode_file_header,
)
from migrator._wire.savevm import (
    encode_footer as encode_footer,
)
from migrator._wire.savevm import (
    encode_section_end as encode_section_end,
)
from migrator._wire.savevm import (
    encode_section_full as encode_section_full,
)
from migrator._wire.savevm import (
    encode_section_part as encode_section_part,
)
from migrator._wire.savevm import (
    encode_section_start as encode_section_start,
)
from migrator._wire.savevm import (
    encode_vm_description as encode_vm_description,
)
from migrator._wire.vfio import (
    MARKER_VALUES as MARKER_VALUES,
)
from migrator._wire.vfio import (
    Marker as Marker,
)
from migrator._wire.vfio import (
    encode_config_blob as encode_config_blob,
)
from migrator._wire.vfio import (
    encode_data_header as encode_data_header,
)
from migrator._wire.vfio import (
    encode_marker as encode_marker,
)
