-- Orthanc auto-routing to the her2low DICOM node (Orthanc Lua scripting).
-- Every stable MR or SEG series is sent once it has been quiet for StableAge seconds.
-- Orthanc fires OnStableSeries again on a late instance and re-sends the whole series;
-- the node stores only what is new and re-runs the analysis.
-- Filter on Modality so that results the node may send back (SR, parametric maps) are
-- never routed to it again.
function OnStableSeries(seriesId, tags, metadata)
  if tags['Modality'] == 'MR' or tags['Modality'] == 'SEG' then
    -- DumpJson(body) without the second argument: with `true` numbers become strings and
    -- Orthanc rejects the request.
    RestApiPost('/modalities/her2low/store',
                DumpJson({Resources = {seriesId}, Asynchronous = true}))
  end
end
